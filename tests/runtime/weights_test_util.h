// Test helpers for the weight-file tests: a GGUF writer (so tests build small valid files and
// corrupt them field by field) and a temporary directory.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace asynctls::testing {

class GgufBuilder {
 public:
  enum Type : uint32_t {
    kU8 = 0,
    kI8 = 1,
    kU16 = 2,
    kI16 = 3,
    kU32 = 4,
    kI32 = 5,
    kF32 = 6,
    kBool = 7,
    kString = 8,
    kArray = 9,
    kU64 = 10,
    kI64 = 11,
    kF64 = 12,
  };

  // Byte positions of fields in the last Build() output, for corruption tests.
  struct Layout {
    size_t tensor_count = 8, kv_count = 16;
    std::vector<size_t> tensor_ndims, tensor_dims, tensor_type, tensor_offset;
    size_t data_offset = 0;
  };

  explicit GgufBuilder(uint32_t version = 3, uint32_t alignment = 32)
      : version_(version), alignment_(alignment) {}

  // Raw key/value: `value` is the encoded value bytes (without the type).
  GgufBuilder& Raw(const std::string& key, uint32_t type, const std::string& value) {
    kv_ += Str(key) + Pod(type) + value;
    ++kv_count_;
    return *this;
  }
  GgufBuilder& U32(const std::string& k, uint32_t v) { return Raw(k, kU32, Pod(v)); }
  GgufBuilder& I32(const std::string& k, int32_t v) { return Raw(k, kI32, Pod(v)); }
  GgufBuilder& U64(const std::string& k, uint64_t v) { return Raw(k, kU64, Pod(v)); }
  GgufBuilder& F32(const std::string& k, float v) { return Raw(k, kF32, Pod(v)); }
  GgufBuilder& F64(const std::string& k, double v) { return Raw(k, kF64, Pod(v)); }
  GgufBuilder& Bool(const std::string& k, bool v) { return Raw(k, kBool, Pod<uint8_t>(v)); }
  GgufBuilder& String(const std::string& k, const std::string& v) {
    return Raw(k, kString, Str(v));
  }
  GgufBuilder& StringArray(const std::string& k, const std::vector<std::string>& v) {
    std::string body = Pod<uint32_t>(kString) + Pod<uint64_t>(v.size());
    for (const auto& s : v) body += Str(s);
    return Raw(k, kArray, body);
  }
  GgufBuilder& I32Array(const std::string& k, const std::vector<int32_t>& v) {
    std::string body = Pod<uint32_t>(kI32) + Pod<uint64_t>(v.size());
    for (int32_t x : v) body += Pod(x);
    return Raw(k, kArray, body);
  }
  GgufBuilder& F32Array(const std::string& k, const std::vector<float>& v) {
    std::string body = Pod<uint32_t>(kF32) + Pod<uint64_t>(v.size());
    for (float x : v) body += Pod(x);
    return Raw(k, kArray, body);
  }

  // `ne` in GGUF order (innermost first); `data` the raw tensor bytes.
  GgufBuilder& Tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type,
                      std::string data) {
    tensors_.push_back({name, std::move(ne), type, std::move(data)});
    return *this;
  }

  std::string Build() {
    layout_ = Layout();
    std::string out = Pod<uint32_t>(0x46554747) + Pod(version_) + Pod<uint64_t>(tensors_.size()) +
                      Pod<uint64_t>(kv_count_ + (alignment_ != 32 ? 1 : 0)) + kv_;
    if (alignment_ != 32) out += Str("general.alignment") + Pod<uint32_t>(kU32) + Pod(alignment_);
    uint64_t offset = 0;
    std::vector<uint64_t> offsets;
    for (const auto& t : tensors_) {
      out += Str(t.name);
      layout_.tensor_ndims.push_back(out.size());
      out += Pod<uint32_t>(t.ne.size());
      layout_.tensor_dims.push_back(out.size());
      for (uint64_t d : t.ne) out += Pod(d);
      layout_.tensor_type.push_back(out.size());
      out += Pod(t.type);
      layout_.tensor_offset.push_back(out.size());
      out += Pod(offset);
      offsets.push_back(offset);
      offset = (offset + t.data.size() + alignment_ - 1) / alignment_ * alignment_;
    }
    out.resize((out.size() + alignment_ - 1) / alignment_ * alignment_, '\0');
    layout_.data_offset = out.size();
    for (size_t i = 0; i < tensors_.size(); ++i) {
      out.resize(layout_.data_offset + offsets[i], '\0');
      out += tensors_[i].data;
    }
    return out;
  }
  const Layout& layout() const { return layout_; }

  template <typename T>
  static std::string Pod(T v) {
    return std::string(reinterpret_cast<const char*>(&v), sizeof(v));
  }
  static std::string Str(const std::string& s) { return Pod<uint64_t>(s.size()) + s; }

 private:
  struct PendingTensor {
    std::string name;
    std::vector<uint64_t> ne;
    uint32_t type;
    std::string data;
  };
  uint32_t version_, alignment_;
  std::string kv_;
  uint64_t kv_count_ = 0;
  std::vector<PendingTensor> tensors_;
  Layout layout_;
};

inline std::string FloatBytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

// A fresh directory under $TMPDIR, removed with its contents on destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl =
        (std::filesystem::temp_directory_path() / "asynctls_weights_XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string Write(const std::string& name, const std::string& bytes) const {
    std::string p = path_ + "/" + name;
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }

 private:
  std::string path_;
};

inline std::string ModelPath() {
  if (const char* env = std::getenv("ASYNCTLS_MODEL_PATH"); env != nullptr && *env) return env;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : "") + "/.cache/asynctls/SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace asynctls::testing
