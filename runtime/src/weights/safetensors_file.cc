#include "weights/safetensors_file.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/status.h"
#include "weights/config_loaders.h"
#include "weights/hf_names.h"
#include "weights/mapped_file.h"

namespace asynctls::weights {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// The safetensors format caps its JSON header at 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

int64_t DtypeSize(absl::string_view dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" ||
      dtype == "F8_E5M2") {
    return 1;
  }
  return 0;
}

struct StTensor {
  std::string hf_name;
  std::string dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  uint64_t num_bytes = 0;
  int64_t num_elements = 0;
  size_t shard = 0;
};

absl::StatusOr<uint64_t> NonNegative(const json& v, absl::string_view what) {
  if (!v.is_number_unsigned()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is not a non-negative integer"));
  }
  return v.get<uint64_t>();
}

// Parses one mapped shard's header and appends its tensors.
absl::Status ParseShard(const ByteRegion& file, const std::string& path, size_t shard,
                        std::vector<StTensor>* out) {
  auto fail = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", why));
  };
  if (file.size() < 8) {
    return absl::DataLossError(
        absl::StrCat(path, ": truncated (", file.size(), " bytes, no safetensors header length)"));
  }
  uint64_t header_len;
  std::memcpy(&header_len, file.data(), 8);
  if (header_len > kMaxHeaderBytes) {
    return fail(absl::StrCat("header length ", header_len, " exceeds 100 MB"));
  }
  if (header_len > file.size() - 8) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", header_len,
                                            " runs past end of file (", file.size(), " bytes)"));
  }
  const char* header = reinterpret_cast<const char*>(file.data() + 8);
  json j = json::parse(header, header + header_len, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return fail("header is not valid JSON");
  if (!j.is_object()) return fail("header is not a JSON object");
  const uint8_t* data = file.data() + 8 + header_len;
  const uint64_t data_size = file.size() - 8 - header_len;

  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string& name = it.key();
    const json& e = it.value();
    if (!e.is_object()) return fail(absl::StrCat("tensor ", name, " is not an object"));
    auto dt = e.find("dtype");
    auto shape = e.find("shape");
    auto offs = e.find("data_offsets");
    if (dt == e.end() || !dt->is_string()) return fail(absl::StrCat(name, ": bad \"dtype\""));
    if (shape == e.end() || !shape->is_array() || shape->size() > 8) {
      return fail(absl::StrCat(name, ": bad \"shape\""));
    }
    if (offs == e.end() || !offs->is_array() || offs->size() != 2) {
      return fail(absl::StrCat(name, ": bad \"data_offsets\""));
    }
    StTensor t;
    t.hf_name = name;
    t.dtype = dt->get<std::string>();
    t.shard = shard;
    const int64_t esize = DtypeSize(t.dtype);
    if (esize == 0) return fail(absl::StrCat(name, ": unknown dtype \"", t.dtype, "\""));
    int64_t numel = 1, nonzero_product = 1;  // see gguf_file.cc: no partial product overflows
    for (const json& d : *shape) {
      ASYNCTLS_ASSIGN_OR_RETURN(uint64_t dim, NonNegative(d, absl::StrCat(name, " shape entry")));
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (dim != 0 &&
           __builtin_mul_overflow(nonzero_product, static_cast<int64_t>(dim), &nonzero_product))) {
        return fail(absl::StrCat(name, ": shape overflows"));
      }
      numel *= static_cast<int64_t>(dim);
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    int64_t nbytes;
    if (__builtin_mul_overflow(numel, esize, &nbytes)) {
      return fail(absl::StrCat(name, ": byte size overflows"));
    }
    ASYNCTLS_ASSIGN_OR_RETURN(uint64_t begin,
                              NonNegative((*offs)[0], absl::StrCat(name, " begin")));
    ASYNCTLS_ASSIGN_OR_RETURN(uint64_t end, NonNegative((*offs)[1], absl::StrCat(name, " end")));
    if (begin > end || end - begin != static_cast<uint64_t>(nbytes)) {
      return fail(absl::StrCat(name, ": data_offsets [", begin, ", ", end, ") do not hold ", nbytes,
                               " bytes of ", t.dtype, " for its shape"));
    }
    if (end > data_size) {
      return absl::DataLossError(absl::StrCat(path, ": ", name, ": tensor data past EOF (end ", end,
                                              " > ", data_size, " bytes of data)"));
    }
    t.data = data + begin;
    t.num_bytes = static_cast<uint64_t>(nbytes);
    t.num_elements = numel;
    if (nbytes > 0) ranges.emplace_back(begin, end);
    out->push_back(std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      return fail(absl::StrCat("overlapping tensor data at offset ", ranges[i].first));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class SafetensorsWeightFile final : public WeightFile {
 public:
  SafetensorsWeightFile(std::vector<std::unique_ptr<ByteRegion>> shards,
                        std::vector<StTensor> tensors, std::optional<std::string> config_json,
                        std::string config_path)
      : shards_(std::move(shards)),
        tensors_(std::move(tensors)),
        config_json_(std::move(config_json)),
        config_path_(std::move(config_path)) {}

  // Maps names; INVALID_ARGUMENT when two tensors end up with the same name.
  absl::Status Index() {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      auto canonical = CanonicalNameFromHf(tensors_[i].hf_name);
      if (canonical.has_value() && canonical->empty()) continue;  // a buffer, not a weight
      std::string name = canonical.value_or(tensors_[i].hf_name);
      if (!index_.emplace(name, i).second) {
        return absl::InvalidArgumentError(absl::StrCat("safetensors: duplicate tensor ",
                                                       tensors_[i].hf_name, " (as ", name, ")"));
      }
      infos_.push_back({name, tensors_[i].shape, tensors_[i].dtype});
    }
    return absl::OkStatus();
  }

  std::string format() const override { return "safetensors"; }

  absl::StatusOr<ModelConfig> ReadModelConfig() const override {
    if (!config_json_.has_value()) {
      return absl::NotFoundError(absl::StrCat("no config.json at ", config_path_));
    }
    auto c = ModelConfigFromHfJson(*config_json_);
    if (!c.ok()) {
      return absl::Status(c.status().code(),
                          absl::StrCat(config_path_, ": ", c.status().message()));
    }
    return ReconcileHfConfigWithTensors(std::move(c).value(), *this);
  }

  const std::vector<WeightTensorInfo>& tensors() const override { return infos_; }
  bool HasTensor(const std::string& name) const override { return index_.contains(name); }

  absl::StatusOr<std::vector<float>> ReadF32(const std::string& name) const override {
    auto it = index_.find(name);
    if (it == index_.end()) return absl::NotFoundError(absl::StrCat("no tensor ", name));
    const StTensor& t = tensors_[it->second];
    if (t.dtype != "F32" && t.dtype != "F16" && t.dtype != "BF16") {
      return absl::UnimplementedError(
          absl::StrCat("tensor ", name, ": dtype ", t.dtype, " is not F32, F16 or BF16"));
    }
    std::vector<float> out(static_cast<size_t>(t.num_elements));
    ASYNCTLS_RETURN_IF_ERROR(
        DequantizeGguf(t.dtype, t.data, t.num_bytes, t.num_elements, out.data()));
    return out;
  }

  std::optional<std::string> MetaString(const std::string&) const override { return {}; }
  std::optional<int64_t> MetaInt(const std::string&) const override { return {}; }
  std::optional<double> MetaFloat(const std::string&) const override { return {}; }
  std::optional<std::vector<std::string>> MetaStringArray(const std::string&) const override {
    return {};
  }
  std::optional<std::vector<int64_t>> MetaIntArray(const std::string&) const override { return {}; }
  std::optional<std::vector<float>> MetaFloatArray(const std::string&) const override { return {}; }

 private:
  std::vector<std::unique_ptr<ByteRegion>> shards_;
  std::vector<StTensor> tensors_;
  std::optional<std::string> config_json_;
  std::string config_path_;
  std::vector<WeightTensorInfo> infos_;
  absl::flat_hash_map<std::string, size_t> index_;
};

// Shard file names from model.safetensors.index.json, checked to stay inside `dir`.
absl::StatusOr<std::vector<std::string>> ShardsFromIndex(
    const std::string& index_path, absl::flat_hash_map<std::string, std::string>* weight_map) {
  ASYNCTLS_ASSIGN_OR_RETURN(std::string text, ReadTextFile(index_path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto fail = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": ", why));
  };
  if (j.is_discarded() || !j.is_object()) return fail("not a JSON object");
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) return fail("no \"weight_map\" object");
  std::set<std::string> files;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it.value().is_string())
      return fail(absl::StrCat("weight_map[", it.key(), "] is not a string"));
    std::string file = it.value().get<std::string>();
    if (file.empty() || absl::StrContains(file, "/") || file == "." || file == "..") {
      return fail(absl::StrCat("shard name \"", file, "\" is not a plain file name"));
    }
    files.insert(file);
    (*weight_map)[it.key()] = file;
  }
  if (files.empty()) return fail("weight_map is empty");
  return std::vector<std::string>(files.begin(), files.end());
}

}  // namespace

absl::StatusOr<std::unique_ptr<WeightFile>> OpenSafetensors(const std::string& path) {
  std::error_code ec;
  const bool is_dir = fs::is_directory(path, ec);
  std::vector<std::string> shard_paths;
  absl::flat_hash_map<std::string, std::string> weight_map;
  std::string dir;
  if (is_dir) {
    dir = path;
    const std::string config = dir + "/config.json";
    if (!fs::exists(config, ec)) {
      return absl::NotFoundError(absl::StrCat(path, ": directory has no config.json"));
    }
    const std::string index = dir + "/model.safetensors.index.json";
    if (fs::exists(index, ec)) {
      ASYNCTLS_ASSIGN_OR_RETURN(auto names, ShardsFromIndex(index, &weight_map));
      for (const auto& n : names) shard_paths.push_back(dir + "/" + n);
    } else {
      for (const auto& entry : fs::directory_iterator(dir, ec)) {
        const std::string p = entry.path().string();
        if (entry.is_regular_file() && absl::EndsWith(p, ".safetensors")) shard_paths.push_back(p);
      }
      if (ec)
        return absl::InvalidArgumentError(absl::StrCat("cannot list ", dir, ": ", ec.message()));
      std::sort(shard_paths.begin(), shard_paths.end());
      if (shard_paths.empty()) {
        return absl::NotFoundError(absl::StrCat(path, ": no *.safetensors files"));
      }
    }
  } else {
    shard_paths.push_back(path);
    dir = fs::path(path).parent_path().string();
    if (dir.empty()) dir = ".";
  }

  std::vector<std::unique_ptr<ByteRegion>> shards;
  std::vector<StTensor> tensors;
  for (size_t i = 0; i < shard_paths.size(); ++i) {
    ASYNCTLS_ASSIGN_OR_RETURN(auto mapped, MappedFile::Open(shard_paths[i]));
    ASYNCTLS_RETURN_IF_ERROR(ParseShard(*mapped, shard_paths[i], i, &tensors));
    shards.push_back(std::move(mapped));
  }
  if (!weight_map.empty()) {
    // Every tensor the index names must be in the shard it names.
    absl::flat_hash_map<std::string, size_t> where;
    for (const StTensor& t : tensors) where[t.hf_name] = t.shard;
    for (const auto& [name, file] : weight_map) {
      auto it = where.find(name);
      if (it == where.end() || fs::path(shard_paths[it->second]).filename() != file) {
        return absl::InvalidArgumentError(
            absl::StrCat("model.safetensors.index.json: tensor ", name, " is not in shard ", file));
      }
    }
  }

  const std::string config_path = dir + "/config.json";
  std::optional<std::string> config_json;
  if (auto text = ReadTextFile(config_path); text.ok()) config_json = std::move(text).value();
  auto file = std::make_unique<SafetensorsWeightFile>(std::move(shards), std::move(tensors),
                                                      std::move(config_json), config_path);
  ASYNCTLS_RETURN_IF_ERROR(file->Index());
  return std::unique_ptr<WeightFile>(std::move(file));
}

absl::StatusOr<std::unique_ptr<WeightFile>> OpenSafetensorsBytes(std::string bytes) {
  auto region = std::make_unique<OwnedBytes>(std::move(bytes));
  std::vector<StTensor> tensors;
  ASYNCTLS_RETURN_IF_ERROR(ParseShard(*region, "<memory>", 0, &tensors));
  std::vector<std::unique_ptr<ByteRegion>> shards;
  shards.push_back(std::move(region));
  auto file = std::make_unique<SafetensorsWeightFile>(std::move(shards), std::move(tensors),
                                                      std::nullopt, "<memory>/config.json");
  ASYNCTLS_RETURN_IF_ERROR(file->Index());
  return std::unique_ptr<WeightFile>(std::move(file));
}

}  // namespace asynctls::weights
