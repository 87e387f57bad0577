# asynctls_test(NAME SOURCES... LIBS ... LABELS ...): one GoogleTest binary registered with CTest.
function(asynctls_test name)
  cmake_parse_arguments(T "" "TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${T_SOURCES})
  target_link_libraries(${name} PRIVATE ${T_LIBS} GTest::gtest GTest::gtest_main Threads::Threads)
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 600)
  endif()
  # CTest names are "<binary>.<Suite>.<Test>", so `ctest -R <binary>` selects one file's tests.
  # The CPU model tests compare batched and single-sequence forwards bit for bit, which holds for
  # OpenBLAS's generic x86 kernels but not for its AVX-512 ones (1- and 3-row GEMMs round apart):
  # tests pin the generic ones, whatever the machine or the caller's OPENBLAS_CORETYPE.
  set(env "")
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64")
    set(env ENVIRONMENT OPENBLAS_CORETYPE=Prescott)
  endif()
  gtest_discover_tests(${name} TEST_PREFIX "${name}."
                       PROPERTIES LABELS "${T_LABELS}" TIMEOUT ${T_TIMEOUT} ${env}
                       DISCOVERY_TIMEOUT 60)
endfunction()

set(ASYNCTLS_WARNINGS -Wall -Wextra -Wno-unused-parameter)
