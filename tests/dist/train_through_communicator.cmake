# `mpirun -np 1 switchyard train --num_global_experts 8` (every layer expert parallel through the
# communicator: MPI on cpu, NCCL on cuda) against the same training in one process without a
# communicator: the first 20 f32 losses agree within 1e-3 relative, dropless and at capacity
# factor 1 (the packed layout's all-to-all-v and the padded layout's all-to-all). With
# DEVICE=cuda it prints "no CUDA device: skipped" (ctest: skipped) where CUDA is not available.
#   cmake -DMPIEXEC=<mpirun> -DTOOL=<switchyard> -DCHECKER=<json_lines_check> -DWORK_DIR=<dir>
#         -DDEVICE=cpu|cuda -P this file
foreach(cf 0 1)
  set(common train --json --num_steps 20 --dtype f32 --seed 3 --capacity_factor ${cf}
             --device ${DEVICE})
  set(one ${WORK_DIR}/train_${DEVICE}_cf${cf}_one_process.jsonl)
  set(comm ${WORK_DIR}/train_${DEVICE}_cf${cf}_communicator.jsonl)
  execute_process(COMMAND ${TOOL} ${common} --num_local_experts 8 RESULT_VARIABLE rc
                  OUTPUT_FILE ${one} ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    if(DEVICE STREQUAL "cuda" AND err MATCHES "CUDA is not available")
      message("no CUDA device: skipped")
      return()
    endif()
    message(FATAL_ERROR "train --device ${DEVICE} failed (${rc}): ${err}")
  endif()
  execute_process(COMMAND ${MPIEXEC} -n 1 ${TOOL} ${common} --num_global_experts 8
                  RESULT_VARIABLE rc OUTPUT_FILE ${comm} ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "mpirun -n 1 train --device ${DEVICE} --num_global_experts 8 failed "
                        "(${rc}): ${err}")
  endif()
  execute_process(COMMAND ${CHECKER} ${one} --min-lines 20 --loss-matches ${comm} --rel-tol 1e-3
                  RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "capacity_factor ${cf}: the losses through the communicator differ "
                        "from the one-process run")
  endif()
endforeach()
