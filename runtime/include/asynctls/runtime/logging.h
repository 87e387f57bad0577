// Project logging: a few macros with a component prefix. Thread-safe (one fprintf per line).
// Level from ASYNCTLS_LOG_LEVEL (debug knob, see env_knobs.h): 0 debug, 1 info, 2 warn, 3 error.
#pragma once

#include <string>

#include "absl/strings/str_cat.h"

namespace asynctls {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

bool LogEnabled(LogLevel level);
void LogLine(LogLevel level, const char* file, int line, const std::string& message);
// Prefix printed before every line of this process, e.g. "worker r1" (default: none).
void SetLogPrefix(std::string prefix);

}  // namespace asynctls

#define ASYNCTLS_LOG(level, ...)                                                       \
  do {                                                                                 \
    if (::asynctls::LogEnabled(::asynctls::LogLevel::level))                           \
      ::asynctls::LogLine(::asynctls::LogLevel::level, __FILE__, __LINE__,             \
                          ::absl::StrCat(__VA_ARGS__));                                \
  } while (0)
#define ASYNCTLS_LOG_INFO(...) ASYNCTLS_LOG(kInfo, __VA_ARGS__)
#define ASYNCTLS_LOG_WARN(...) ASYNCTLS_LOG(kWarning, __VA_ARGS__)
#define ASYNCTLS_LOG_ERROR(...) ASYNCTLS_LOG(kError, __VA_ARGS__)
#ifndef NDEBUG
#define ASYNCTLS_LOG_DEBUG(...) ASYNCTLS_LOG(kDebug, __VA_ARGS__)
#else
#define ASYNCTLS_LOG_DEBUG(...) \
  do {                          \
  } while (0)
#endif
