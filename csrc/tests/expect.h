// The tiny check harness of the C++ unit tests: EXPECT counts failures and reports them with
// their line; finish() prints a summary and gives main's exit status.
#pragma once

#include <cstdio>

namespace oqfl_test {

inline int failures = 0;

inline int finish(const char* suite) {
  if (failures) std::fprintf(stderr, "%s: %d check(s) failed\n", suite, failures);
  else std::printf("%s: all checks passed\n", suite);
  return failures ? 1 : 0;
}

}  // namespace oqfl_test

#define EXPECT(cond)                                                              \
  do {                                                                            \
    if (!(cond)) {                                                                \
      ++oqfl_test::failures;                                                      \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);   \
    }                                                                             \
  } while (0)
