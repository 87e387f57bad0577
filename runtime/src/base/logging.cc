#include "asynctls/runtime/logging.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace asynctls {
namespace {

int ThresholdFromEnv() {
  const char* v = std::getenv("ASYNCTLS_LOG_LEVEL");
  return v ? std::atoi(v) : static_cast<int>(LogLevel::kInfo);
}

std::mutex& PrefixMutex() {
  static std::mutex m;
  return m;
}
std::string& Prefix() {
  static std::string p;
  return p;
}

}  // namespace

bool LogEnabled(LogLevel level) {
  static const int threshold = ThresholdFromEnv();
  return static_cast<int>(level) >= threshold;
}

void SetLogPrefix(std::string prefix) {
  std::lock_guard<std::mutex> lock(PrefixMutex());
  Prefix() = std::move(prefix);
}

void LogLine(LogLevel level, const char* file, int line, const std::string& message) {
  static const char kLetters[] = {'D', 'I', 'W', 'E'};
  const char* base = std::strrchr(file, '/');
  base = base ? base + 1 : file;
  std::string prefix;
  {
    std::lock_guard<std::mutex> lock(PrefixMutex());
    prefix = Prefix();
  }
  std::fprintf(stderr, "%c %s%s%s:%d] %s\n", kLetters[static_cast<int>(level)], prefix.c_str(),
               prefix.empty() ? "" : " ", base, line, message.c_str());
}

}  // namespace asynctls
