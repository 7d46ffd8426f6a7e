# Runs `switchyard train --json` two ways and checks that their losses agree step by step within
# 1e-3 relative (json_lines_check --loss-matches), for the ctest cases that compare two ways of
# computing the same training (CPU and CUDA; with and without a communicator).
#   cmake -DFIRST=<program|args...> -DSECOND=<program|args...> -DCHECKER=<json_lines_check>
#         -DWORK_DIR=<dir> -DNAME=<file stem> -P this file
# FIRST and SECOND separate arguments with '|'. Where a run fails because CUDA is not available,
# prints "no CUDA device: skipped" (ctest: skipped).
cmake_minimum_required(VERSION 3.25)

foreach(run FIRST SECOND)
  string(REPLACE "|" ";" command "${${run}}")
  set(out_${run} ${WORK_DIR}/${NAME}_${run}.jsonl)
  execute_process(COMMAND ${command} RESULT_VARIABLE rc OUTPUT_FILE ${out_${run}}
                  ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    if(err MATCHES "CUDA is not available")
      message("no CUDA device: skipped")
      return()
    endif()
    string(REPLACE ";" " " shown "${command}")
    message(FATAL_ERROR "${shown} failed (${rc}): ${err}")
  endif()
endforeach()
execute_process(COMMAND ${CHECKER} ${out_FIRST} --min-lines 20 --loss-matches ${out_SECOND}
                        --rel-tol 1e-3 RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${NAME}: the two runs' losses differ")
endif()
