# Runs `switchyard` once and checks how it ended, for the tool's ctest cases:
#
#   cmake -DTOOL=<exe> -DARGS=train|--top|0 -DEXPECT_RC=2 [-DERROR_LINE=ON]
#         [-DCHECKER=<json_lines_check> -DCHECK_ARGS=--keys|a,b] [-DWORK_DIR=<dir>]
#         -P run_tool.cmake
#
# ARGS and CHECK_ARGS separate arguments with '|' (a ';' would be split by add_test).
# EXPECT_RC: the exact exit code. ERROR_LINE: stderr is exactly one `switchyard: error: ...` line.
# CHECKER: stdout is saved to a file and checked by json_lines_check with CHECK_ARGS.
cmake_minimum_required(VERSION 3.25)

string(REPLACE "|" ";" args "${ARGS}")
execute_process(COMMAND "${TOOL}" ${args}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
string(REPLACE ";" " " shown "${ARGS}")
string(REPLACE "|" " " shown "${shown}")

if(NOT "${rc}" STREQUAL "${EXPECT_RC}")
  message(FATAL_ERROR "switchyard ${shown}: exit code ${rc}, expected ${EXPECT_RC}\n"
                      "stderr:\n${err}\nstdout (end):\n${out}")
endif()

if(ERROR_LINE)
  if(NOT err MATCHES "^switchyard: error: [^\n]+\n$")
    message(FATAL_ERROR "switchyard ${shown}: stderr is not one `switchyard: error: ...` line:\n"
                        "${err}")
  endif()
endif()

if(CHECKER)
  if(NOT WORK_DIR)
    set(WORK_DIR "${CMAKE_CURRENT_BINARY_DIR}")
  endif()
  string(MAKE_C_IDENTIFIER "${ARGS}" name)
  set(file "${WORK_DIR}/${name}.jsonl")
  file(WRITE "${file}" "${out}")
  string(REPLACE "|" ";" check_args "${CHECK_ARGS}")
  execute_process(COMMAND "${CHECKER}" "${file}" ${check_args}
    RESULT_VARIABLE check_rc OUTPUT_VARIABLE check_out ERROR_VARIABLE check_err)
  if(NOT check_rc EQUAL 0)
    message(FATAL_ERROR "switchyard ${shown}: output check failed: ${check_err}")
  endif()
  message(STATUS "switchyard ${shown}: ${check_out}")
endif()
