// Minimal check helpers shared by the C++ tests (no test framework needed in CI).
#pragma once
#include <cstdio>
#include <string>

namespace fastlora_test {

inline int& failures() {
  static int n = 0;
  return n;
}

inline void expect(bool cond, const std::string& what) {
  std::printf("%s: %s\n", cond ? "ok  " : "FAIL", what.c_str());
  if (!cond) ++failures();
}

// Prints the summary line and returns the process exit code.
inline int finish() {
  std::printf("%d failed\n", failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace fastlora_test
