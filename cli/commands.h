// The CLI's commands, one file each. Each parses its own flags (argv after the command name)
// and returns a Status the entry prints.
#pragma once

#include "absl/status/status.h"

namespace asynctls {

absl::Status RunGenerate(int argc, char** argv);  // generate.cc
absl::Status RunServe(int argc, char** argv);     // serve.cc (gRPC builds only)
absl::Status RunBench(int argc, char** argv);     // bench.cc (gRPC builds only)
absl::Status RunCalibrate(int argc, char** argv);  // calibrate.cc

}  // namespace asynctls
