// Status helpers used at every boundary above the kernels (absl::Status / StatusOr).
#pragma once

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define ASYNCTLS_CONCAT_INNER(a, b) a##b
#define ASYNCTLS_CONCAT(a, b) ASYNCTLS_CONCAT_INNER(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define ASYNCTLS_RETURN_IF_ERROR(expr)                \
  do {                                                \
    ::absl::Status _asynctls_status = (expr);         \
    if (!_asynctls_status.ok()) return _asynctls_status; \
  } while (0)

// `ASYNCTLS_ASSIGN_OR_RETURN(auto x, F());` — unwraps a StatusOr or returns its error.
#define ASYNCTLS_ASSIGN_OR_RETURN(lhs, expr) \
  ASYNCTLS_ASSIGN_OR_RETURN_IMPL(ASYNCTLS_CONCAT(_asynctls_or_, __LINE__), lhs, expr)
#define ASYNCTLS_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) return std::move(tmp).status();       \
  lhs = std::move(tmp).value()

// A broken internal invariant is a bug: abort with the location and a message.
#define ASYNCTLS_CHECK(cond, ...)                                                   \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "CHECK failed at %s:%d: %s %s\n", __FILE__, __LINE__, #cond, \
                   ::absl::StrCat("" __VA_OPT__(, ) __VA_ARGS__).c_str());          \
      std::abort();                                                                 \
    }                                                                               \
  } while (0)
