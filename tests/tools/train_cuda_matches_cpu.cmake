# `switchyard train --device cuda` in f32 against the same run on the CPU: the first 20 losses
# agree within 1e-3 relative. Prints "no CUDA device: skipped" (ctest: skipped) where CUDA is not
# available.
#   cmake -DTOOL=<switchyard> -DCHECKER=<json_lines_check> -DWORK_DIR=<dir> -P this file
set(common train --json --num_steps 20 --dtype f32 --seed 3 --capacity_factor 0
           --num_local_experts 8)
foreach(device cpu cuda)
  execute_process(COMMAND ${TOOL} ${common} --device ${device} RESULT_VARIABLE rc
                  OUTPUT_FILE ${WORK_DIR}/train_${device}.jsonl ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    if(device STREQUAL "cuda" AND err MATCHES "CUDA is not available")
      message("no CUDA device: skipped")
      return()
    endif()
    message(FATAL_ERROR "train --device ${device} failed (${rc}): ${err}")
  endif()
endforeach()
execute_process(COMMAND ${CHECKER} ${WORK_DIR}/train_cpu.jsonl --min-lines 20 --loss-matches
                        ${WORK_DIR}/train_cuda.jsonl --rel-tol 1e-3 RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the CPU and CUDA losses differ")
endif()
