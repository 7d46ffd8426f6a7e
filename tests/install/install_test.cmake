# Installs a switchyard build into a fresh prefix, then configures, builds and runs the consumer
# project against it. Run by ctest:
#   cmake -DSY_BUILD_DIR=... -DSY_CONSUMER_DIR=... -DSY_WORK_DIR=... [-DSY_GENERATOR=...]
#         [-DSY_CXX_COMPILER=...] [-DSY_BUILD_TYPE=...] [-DSY_SANITIZE=ON] -P install_test.cmake
cmake_minimum_required(VERSION 3.25)

foreach(var SY_BUILD_DIR SY_CONSUMER_DIR SY_WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "install_test.cmake: -D${var}=... is required")
  endif()
endforeach()

set(prefix ${SY_WORK_DIR}/prefix)
set(consumer_build ${SY_WORK_DIR}/consumer-build)
file(REMOVE_RECURSE ${SY_WORK_DIR})
file(MAKE_DIRECTORY ${SY_WORK_DIR})

function(run_step name)
  message(STATUS "[install test] ${name}: ${ARGN}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "[install test] ${name} failed (exit status ${rc})")
  endif()
endfunction()

# 1. Install.
run_step("install" ${CMAKE_COMMAND} --install ${SY_BUILD_DIR} --prefix ${prefix})
if(NOT EXISTS ${prefix}/include/switchyard/switchyard.h)
  message(FATAL_ERROR "[install test] ${prefix}/include/switchyard/switchyard.h was not installed")
endif()

# 2. Configure the consumer against the prefix only (no package registries).
set(configure_args -S ${SY_CONSUMER_DIR} -B ${consumer_build}
    -DCMAKE_PREFIX_PATH=${prefix}
    -DSY_EXPECTED_PREFIX=${prefix}
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
    -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)
if(SY_GENERATOR)
  list(APPEND configure_args -G ${SY_GENERATOR})
endif()
if(SY_CXX_COMPILER)
  list(APPEND configure_args -DCMAKE_CXX_COMPILER=${SY_CXX_COMPILER})
endif()
if(SY_BUILD_TYPE)
  list(APPEND configure_args -DCMAKE_BUILD_TYPE=${SY_BUILD_TYPE})
endif()
if(SY_SANITIZE)
  # The installed library is instrumented: the consumer must link the sanitizer runtimes too.
  list(APPEND configure_args
       "-DCMAKE_CXX_FLAGS=-fsanitize=address,undefined -fno-omit-frame-pointer"
       "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined")
endif()
run_step("configure consumer" ${CMAKE_COMMAND} ${configure_args})

# 3. Build and run it.
run_step("build consumer" ${CMAKE_COMMAND} --build ${consumer_build})
find_program(consumer_exe NAMES switchyard_consumer PATHS ${consumer_build} NO_DEFAULT_PATH
             REQUIRED)
run_step("run consumer" ${consumer_exe})
message(STATUS "[install test] passed")
