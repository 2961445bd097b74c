// A minimal check harness for the C++ unit tests (no dependency, so the
// tests build in seconds with just a C++ compiler).  Each failed check prints
// where and why; main() returns the number of failures.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace check {

inline int& failures() {
  static int n = 0;
  return n;
}

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> r;
  return r;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().emplace_back(name, std::move(fn)); }
};

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
}

// |a - b| <= atol + rtol * |b|, with NaN == NaN and inf == inf.
inline bool close(double a, double b, double rtol, double atol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

inline std::string pair_text(const char* a_text, double a, const char* b_text, double b) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "%s = %.17g vs %s = %.17g", a_text, a, b_text, b);
  return buf;
}

inline int run_all() {
  for (auto& [name, fn] : registry()) {
    const int before = failures();
    fn();
    std::printf("%-60s %s\n", name.c_str(), failures() == before ? "ok" : "FAILED");
  }
  std::printf("%d test cases, %d failed checks\n", int(registry().size()), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace check

#define CHECK_CAT2(a, b) a##b
#define CHECK_CAT(a, b) CHECK_CAT2(a, b)
#define TEST_CASE(name)                                                          \
  static void name();                                                            \
  static check::Register CHECK_CAT(check_register_, name)(#name, name);          \
  static void name()

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) check::fail(__FILE__, __LINE__, #cond);                         \
  } while (0)

#define CHECK_CLOSE(a, b, rtol, atol)                                            \
  do {                                                                           \
    const double check_a_ = double(a), check_b_ = double(b);                     \
    if (!check::close(check_a_, check_b_, rtol, atol))                           \
      check::fail(__FILE__, __LINE__, check::pair_text(#a, check_a_, #b, check_b_)); \
  } while (0)

// Stops the current test case after a failure (to avoid a flood of follow-ups).
#define REQUIRE(cond)                                                            \
  do {                                                                           \
    if (!(cond)) {                                                               \
      check::fail(__FILE__, __LINE__, #cond);                                    \
      return;                                                                    \
    }                                                                            \
  } while (0)
