# ctest script: compiles the grouped GEMM for sm_90a with ptxas's resource report and fails if a
# wgmma/TMA kernel spills registers to local memory. Those kernels are compiled to the launch
# bound's 168 registers (setmaxnreg raises the consumers' count only at run time), so one more
# live value in the main loop spills the accumulators, and the kernel runs 1.5-2.5x slower
# with correct results: no other test notices.
#   cmake -DNVCC=... -DSOURCE_DIR=... -DOUT=... -P sm90_spills.cmake
execute_process(
  COMMAND "${NVCC}" -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a
          -I "${SOURCE_DIR}/src" -I "${SOURCE_DIR}/include" -Xptxas -v
          -c "${SOURCE_DIR}/src/experts/grouped_gemm_cuda.cu" -o "${OUT}"
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nvcc failed (${rc}):\n${err}")
endif()
string(REPLACE "\n" ";" lines "${out}${err}")
set(kernel "")
set(checked 0)
foreach(line IN LISTS lines)
  if(line MATCHES "Compiling entry function '([^']+)'")
    set(kernel "${CMAKE_MATCH_1}")
  elseif(kernel MATCHES "grouped_gemm_sm90_kernel" AND line MATCHES "([0-9]+) bytes spill stores")
    math(EXPR checked "${checked} + 1")
    if(NOT CMAKE_MATCH_1 EQUAL 0)
      message(FATAL_ERROR "${kernel} spills: ${line}")
    endif()
  endif()
endforeach()
if(checked EQUAL 0)
  message(FATAL_ERROR "no sm_90a grouped GEMM kernel in ptxas's report:\n${out}${err}")
endif()
message(STATUS "${checked} sm_90a grouped GEMM kernels, none spills")
