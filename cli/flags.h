// Flags of one subcommand: `--name value`, `--name=value` and boolean switches. Parsed only
// in the CLI's entry points.
#pragma once

#include <algorithm>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace asynctls {

// Flags of one subcommand: --name value pairs and boolean switches.
class Flags {
 public:
  absl::Status Parse(int argc, char** argv, const std::vector<std::string>& switches) {
    for (int i = 0; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", a, "'"));
      a = a.substr(2);
      if (auto eq = a.find('='); eq != std::string::npos) {
        values_.emplace_back(a.substr(0, eq), a.substr(eq + 1));
        continue;
      }
      if (std::find(switches.begin(), switches.end(), a) != switches.end()) {
        values_.emplace_back(a, "1");
        continue;
      }
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat("--", a, " needs a value"));
      values_.emplace_back(a, argv[++i]);
    }
    return absl::OkStatus();
  }
  bool Has(const std::string& name) const { return !All(name).empty(); }
  std::string Get(const std::string& name, std::string def = "") const {
    auto all = All(name);
    return all.empty() ? def : all.back();
  }
  std::vector<std::string> All(const std::string& name) const {
    std::vector<std::string> out;
    for (const auto& [k, v] : values_)
      if (k == name) out.push_back(v);
    return out;
  }
  template <typename T>
  absl::Status GetNumber(const std::string& name, T* out) const {
    if (!Has(name)) return absl::OkStatus();
    bool ok;
    if constexpr (std::is_floating_point_v<T>) {
      double d;
      ok = absl::SimpleAtod(Get(name), &d);
      *out = static_cast<T>(d);
    } else {
      ok = absl::SimpleAtoi(Get(name), out);
    }
    return ok ? absl::OkStatus()
              : absl::InvalidArgumentError(absl::StrCat("--", name, ": '", Get(name), "' is not a number"));
  }
  absl::Status CheckKnown(const std::vector<std::string>& known) const {
    for (const auto& [k, v] : values_)
      if (std::find(known.begin(), known.end(), k) == known.end())
        return absl::InvalidArgumentError(absl::StrCat("unknown flag --", k));
    return absl::OkStatus();
  }

 private:
  std::vector<std::pair<std::string, std::string>> values_;
};

// Whole file contents; NOT_FOUND naming the path.
absl::StatusOr<std::string> ReadFile(const std::string& path);

}  // namespace asynctls
