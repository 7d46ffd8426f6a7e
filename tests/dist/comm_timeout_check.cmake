# Runs the stalled-rank program under mpirun and checks that the job failed because of the
# communicator's time limit, and soon enough. Run by ctest:
#
#   cmake -DMPIEXEC=<mpirun> -DNP=<ranks> -DPROGRAM=<comm_timeout_check> -DTIMEOUT_SEC=<s>
#         -P comm_timeout_check.cmake
#
# Expects: a non-zero exit, "switchyard: error: rank R: all_to_all ... timed out" on stderr,
# and the whole job over within TIMEOUT_SEC + 10 seconds (launch included).
cmake_minimum_required(VERSION 3.25)

string(TIMESTAMP start "%s")
execute_process(COMMAND "${MPIEXEC}" -np ${NP} "${PROGRAM}"
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
string(TIMESTAMP end "%s")
math(EXPR elapsed "${end} - ${start}")
math(EXPR limit "${TIMEOUT_SEC} + 10")

set(shown "exit ${rc} after ${elapsed} s\nstderr:\n${err}\nstdout:\n${out}")
if("${rc}" STREQUAL "0" OR NOT "${rc}" MATCHES "^[0-9]+$")
  message(FATAL_ERROR "the stalled job did not fail with an exit code: ${shown}")
endif()
if(NOT err MATCHES "switchyard: error: rank [0-9]+: all_to_all \\([a-z0-9]+[^)]*\\) timed out")
  message(FATAL_ERROR "no timeout error naming the rank and the collective: ${shown}")
endif()
if(elapsed GREATER limit)
  message(FATAL_ERROR "the job took ${elapsed} s, more than the time limit + 10 s (${limit}): "
                      "${shown}")
endif()
message(STATUS "stalled job failed as expected in ${elapsed} s (limit ${limit} s)")
