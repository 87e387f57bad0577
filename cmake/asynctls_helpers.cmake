# asynctls_test(NAME SOURCES... LIBS ... LABELS ...): one GoogleTest binary registered with CTest.
function(asynctls_test name)
  cmake_parse_arguments(T "" "TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${T_SOURCES})
  target_link_libraries(${name} PRIVATE ${T_LIBS} GTest::gtest GTest::gtest_main Threads::Threads)
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 600)
  endif()
  # CTest names are "<binary>.<Suite>.<Test>", so `ctest -R <binary>` selects one file's tests.
  gtest_discover_tests(${name} TEST_PREFIX "${name}."
                       PROPERTIES LABELS "${T_LABELS}" TIMEOUT ${T_TIMEOUT}
                       DISCOVERY_TIMEOUT 60)
endfunction()

set(ASYNCTLS_WARNINGS -Wall -Wextra -Wno-unused-parameter)
