#include "weights/gguf_file.h"

#include <cstring>
#include <limits>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/status.h"
#include "weights/config_loaders.h"

namespace asynctls::weights {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as little-endian uint32
constexpr uint32_t kMaxDims = 4;             // GGML_MAX_DIMS
constexpr int kMaxArrayNesting = 8;
constexpr uint64_t kDefaultAlignment = 32;
constexpr uint64_t kMaxAlignment = uint64_t{1} << 30;

// Fewest bytes a value of each type occupies in the file; used to reject counts that cannot
// fit in what is left before allocating for them.
uint64_t MinEncodedSize(GgufValueType t) {
  switch (t) {
    case GgufValueType::kU8:
    case GgufValueType::kI8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kU16:
    case GgufValueType::kI16:
      return 2;
    case GgufValueType::kU32:
    case GgufValueType::kI32:
    case GgufValueType::kF32:
      return 4;
    case GgufValueType::kU64:
    case GgufValueType::kI64:
    case GgufValueType::kF64:
    case GgufValueType::kString:
      return 8;
    case GgufValueType::kArray:
      return 4 + 8;
  }
  return 1;
}

bool IsKnownValueType(uint32_t t) { return t <= 12; }

bool IsIntegerType(GgufValueType t) {
  switch (t) {
    case GgufValueType::kU8:
    case GgufValueType::kI8:
    case GgufValueType::kU16:
    case GgufValueType::kI16:
    case GgufValueType::kU32:
    case GgufValueType::kI32:
    case GgufValueType::kU64:
    case GgufValueType::kI64:
    case GgufValueType::kBool:
      return true;
    default:
      return false;
  }
}

class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }

  absl::Status Need(uint64_t n, absl::string_view what) const {
    if (n > left()) {
      return absl::DataLossError(absl::StrCat("GGUF truncated: reading ", what, " at byte ", pos_,
                                              " needs ", n, " bytes, file has ", left(),
                                              " left (size ", size_, ")"));
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status Read(T* out, absl::string_view what) {
    ASYNCTLS_RETURN_IF_ERROR(Need(sizeof(T), what));
    std::memcpy(out, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }

  absl::Status ReadString(std::string* out, absl::string_view what) {
    const size_t at = pos_;
    uint64_t len;
    ASYNCTLS_RETURN_IF_ERROR(Read(&len, absl::StrCat("length of ", what)));
    if (len > left()) {
      return absl::DataLossError(absl::StrCat("GGUF string length ", len, " of ", what, " at byte ",
                                              at, " runs past end of file (", left(),
                                              " bytes left)"));
    }
    out->assign(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return absl::OkStatus();
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

absl::Status ReadScalar(Cursor& c, GgufValueType type, GgufValue* v, absl::string_view what) {
  v->type = type;
  switch (type) {
    case GgufValueType::kU8: {
      uint8_t x;
      ASYNCTLS_RETURN_IF_ERROR(c.Read(&x, what));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufValueType::kI8: {
      int8_t x;
      ASYNCTLS_RETURN_IF_ERROR(c.Read(&x, what));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufValueType::kBool: {
      uint8_t x;
      ASYNCTLS_RETURN_IF_ERROR(c.Read(&x, what));
      if (x > 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("GGUF bool ", what, " at byte ", c.pos() - 1, " has value ", x));
      }
      v->i = x;
      return absl::OkStatus();
    }
    case GgufValueType::kU16: {
      uint16_t x;
      ASYNCTLS_RETURN_IF_ERROR(c.Read(&x, what));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufValueType::kI16: {
      int16_t x;
      ASYNCTLS_RETURN_IF_ERROR(c.Read(&x, what));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufValueType::kU32: {
      uint32_t x;
      ASYNCTLS_RETURN_IF_ERROR(c.Read(&x, what));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufValueType::kI32: {
      int32_t x;
      ASYNCTLS_RETURN_IF_ERROR(c.Read(&x, what));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufValueType::kU64: {
      uint64_t x;
      ASYNCTLS_RETURN_IF_ERROR(c.Read(&x, what));
      v->u64_overflow = x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
      v->i = v->u64_overflow ? 0 : static_cast<int64_t>(x);
      return absl::OkStatus();
    }
    case GgufValueType::kI64: {
      int64_t x;
      ASYNCTLS_RETURN_IF_ERROR(c.Read(&x, what));
      v->i = x;
      return absl::OkStatus();
    }
    case GgufValueType::kF32: {
      float x;
      ASYNCTLS_RETURN_IF_ERROR(c.Read(&x, what));
      v->f = x;
      return absl::OkStatus();
    }
    case GgufValueType::kF64: {
      double x;
      ASYNCTLS_RETURN_IF_ERROR(c.Read(&x, what));
      v->f = x;
      return absl::OkStatus();
    }
    case GgufValueType::kString:
      return c.ReadString(&v->s, what);
    case GgufValueType::kArray:
      break;
  }
  return absl::InternalError("ReadScalar called for an array");
}

absl::Status ReadValue(Cursor& c, GgufValueType type, GgufValue* v, const std::string& key,
                       int depth);

absl::Status ReadArray(Cursor& c, GgufValue* v, const std::string& key, int depth) {
  v->type = GgufValueType::kArray;
  if (depth >= kMaxArrayNesting) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GGUF metadata ", key, ": arrays nested more than ", kMaxArrayNesting, " deep"));
  }
  const size_t at = c.pos();
  uint32_t elem_type;
  ASYNCTLS_RETURN_IF_ERROR(c.Read(&elem_type, absl::StrCat("array type of ", key)));
  if (!IsKnownValueType(elem_type)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GGUF metadata ", key, ": unknown array element type ", elem_type, " at byte ", at));
  }
  uint64_t count;
  ASYNCTLS_RETURN_IF_ERROR(c.Read(&count, absl::StrCat("array length of ", key)));
  const auto et = static_cast<GgufValueType>(elem_type);
  v->elem_type = et;
  if (count > c.left() / MinEncodedSize(et)) {
    return absl::DataLossError(absl::StrCat("GGUF metadata ", key, ": array length ", count,
                                            " at byte ", at, " runs past end of file (", c.left(),
                                            " bytes left)"));
  }
  const size_t n = static_cast<size_t>(count);
  const std::string what = absl::StrCat("element of ", key);
  if (et == GgufValueType::kArray) {
    v->arrays.resize(n);
    for (size_t i = 0; i < n; ++i) {
      ASYNCTLS_RETURN_IF_ERROR(ReadArray(c, &v->arrays[i], key, depth + 1));
    }
  } else if (et == GgufValueType::kString) {
    v->strings.resize(n);
    for (size_t i = 0; i < n; ++i) ASYNCTLS_RETURN_IF_ERROR(c.ReadString(&v->strings[i], what));
  } else {
    GgufValue elem;
    if (et == GgufValueType::kF32 || et == GgufValueType::kF64) {
      v->floats.resize(n);
    } else {
      v->ints.resize(n);
    }
    for (size_t i = 0; i < n; ++i) {
      ASYNCTLS_RETURN_IF_ERROR(ReadScalar(c, et, &elem, what));
      if (et == GgufValueType::kF32 || et == GgufValueType::kF64) {
        v->floats[i] = elem.f;
      } else {
        if (elem.u64_overflow) v->u64_overflow = true;
        v->ints[i] = elem.i;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ReadValue(Cursor& c, GgufValueType type, GgufValue* v, const std::string& key,
                       int depth) {
  if (type == GgufValueType::kArray) return ReadArray(c, v, key, depth);
  return ReadScalar(c, type, v, absl::StrCat("value of ", key));
}

absl::StatusOr<uint64_t> AlignmentFrom(const GgufValue& v) {
  if (!IsIntegerType(v.type) || v.type == GgufValueType::kBool) {
    return absl::InvalidArgumentError("GGUF general.alignment is not an integer");
  }
  if (v.u64_overflow || v.i <= 0 || static_cast<uint64_t>(v.i) > kMaxAlignment ||
      (v.i & (v.i - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF general.alignment ", v.i, " is not a power of two in [1, 2^30]"));
  }
  return static_cast<uint64_t>(v.i);
}

absl::Status ReadTensorInfo(Cursor& c, size_t index, GgufTensor* t) {
  const std::string what = absl::StrCat("tensor info #", index);
  ASYNCTLS_RETURN_IF_ERROR(c.ReadString(&t->name, absl::StrCat("name of ", what)));
  uint32_t n_dims;
  ASYNCTLS_RETURN_IF_ERROR(c.Read(&n_dims, absl::StrCat("n_dims of ", t->name)));
  if (n_dims > kMaxDims) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF tensor ", t->name, " has ", n_dims,
                                                   " dimensions (at most ", kMaxDims, ")"));
  }
  uint64_t ne[kMaxDims];
  int64_t numel = 1;
  // The product of the non-zero dimensions must fit too, so that no partial product of the
  // shape overflows for a caller (an empty tensor with huge other dimensions is rejected).
  int64_t nonzero_product = 1;
  for (uint32_t d = 0; d < n_dims; ++d) {
    ASYNCTLS_RETURN_IF_ERROR(c.Read(&ne[d], absl::StrCat("dimension of ", t->name)));
    if (ne[d] > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF tensor ", t->name, ": dimension ", d, " = ", ne[d], " overflows"));
    }
    const int64_t dim = static_cast<int64_t>(ne[d]);
    if (dim != 0 && __builtin_mul_overflow(nonzero_product, dim, &nonzero_product)) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF tensor ", t->name, ": element count overflows int64"));
    }
    numel *= dim;
  }
  uint32_t type_id;
  const size_t type_at = c.pos();
  ASYNCTLS_RETURN_IF_ERROR(c.Read(&type_id, absl::StrCat("type of ", t->name)));
  auto traits = GgmlTypeById(type_id);
  if (!traits.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF tensor ", t->name, ": unknown type id ", type_id, " at byte ", type_at));
  }
  t->type = *traits;
  ASYNCTLS_RETURN_IF_ERROR(c.Read(&t->offset, absl::StrCat("data offset of ", t->name)));

  const int64_t row = n_dims > 0 ? static_cast<int64_t>(ne[0]) : 1;
  if (row % traits->block_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF tensor ", t->name, ": row length ", row,
                                                   " is not a multiple of the ", traits->name,
                                                   " block size ", traits->block_size));
  }
  int64_t nbytes;
  if (__builtin_mul_overflow(numel / traits->block_size, traits->type_size, &nbytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF tensor ", t->name, ": byte size overflows int64"));
  }
  t->num_elements = numel;
  t->num_bytes = static_cast<uint64_t>(nbytes);
  t->shape.clear();
  for (uint32_t d = n_dims; d-- > 0;) t->shape.push_back(static_cast<int64_t>(ne[d]));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<GgufContents> ParseGguf(const uint8_t* data, size_t size) {
  Cursor c(data, size);
  GgufContents out;
  uint32_t magic;
  ASYNCTLS_RETURN_IF_ERROR(c.Read(&magic, "magic"));
  if (magic != kGgufMagic) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a GGUF file: bad magic 0x", absl::Hex(magic, absl::kZeroPad8)));
  }
  ASYNCTLS_RETURN_IF_ERROR(c.Read(&out.version, "version"));
  if (out.version != 2 && out.version != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported GGUF version ", out.version,
                     out.version == 1 ? " (v1 is obsolete)"
                                      : (out.version > 0xFFFF ? " (big-endian file?)" : ""),
                     "; supported: 2, 3"));
  }
  uint64_t tensor_count, kv_count;
  ASYNCTLS_RETURN_IF_ERROR(c.Read(&tensor_count, "tensor count"));
  ASYNCTLS_RETURN_IF_ERROR(c.Read(&kv_count, "metadata count"));
  // A tensor info takes at least 24 bytes (name length, n_dims, type, offset), a key/value
  // pair at least 13 (key length, value type, one byte of value).
  if (tensor_count > c.left() / 24) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF tensor count ", tensor_count,
                                                   " is absurd for a file of ", size, " bytes"));
  }
  if (kv_count > c.left() / 13) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF metadata count ", kv_count,
                                                   " is absurd for a file of ", size, " bytes"));
  }

  out.keys.reserve(static_cast<size_t>(kv_count));
  for (uint64_t k = 0; k < kv_count; ++k) {
    std::string key;
    ASYNCTLS_RETURN_IF_ERROR(c.ReadString(&key, absl::StrCat("key of metadata #", k)));
    const size_t type_at = c.pos();
    uint32_t type;
    ASYNCTLS_RETURN_IF_ERROR(c.Read(&type, absl::StrCat("value type of ", key)));
    if (!IsKnownValueType(type)) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF metadata ", key, ": unknown value type ", type, " at byte ", type_at));
    }
    GgufValue value;
    ASYNCTLS_RETURN_IF_ERROR(ReadValue(c, static_cast<GgufValueType>(type), &value, key, 0));
    if (out.metadata.contains(key)) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF duplicate metadata key ", key));
    }
    out.metadata.emplace(key, std::move(value));
    out.keys.push_back(std::move(key));
  }

  out.alignment = kDefaultAlignment;
  if (auto it = out.metadata.find("general.alignment"); it != out.metadata.end()) {
    ASYNCTLS_ASSIGN_OR_RETURN(out.alignment, AlignmentFrom(it->second));
  }

  out.tensors.resize(static_cast<size_t>(tensor_count));
  absl::flat_hash_set<std::string> names;
  names.reserve(out.tensors.size());
  for (size_t i = 0; i < out.tensors.size(); ++i) {
    ASYNCTLS_RETURN_IF_ERROR(ReadTensorInfo(c, i, &out.tensors[i]));
    if (!names.insert(out.tensors[i].name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF duplicate tensor name ", out.tensors[i].name));
    }
  }

  // The data section starts at the next multiple of the alignment; a file without tensor data
  // may end before it.
  const uint64_t end_of_infos = c.pos();
  out.data_offset = (end_of_infos + out.alignment - 1) / out.alignment * out.alignment;
  const uint64_t data_size = size > out.data_offset ? size - out.data_offset : 0;
  for (const GgufTensor& t : out.tensors) {
    if (t.offset % out.alignment != 0) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF tensor ", t.name, ": misaligned offset ",
                                                     t.offset, " (alignment ", out.alignment, ")"));
    }
    if (t.offset > data_size || t.num_bytes > data_size - t.offset) {
      return absl::DataLossError(
          absl::StrCat("GGUF tensor ", t.name, ": tensor data past EOF (offset ", t.offset, " + ",
                       t.num_bytes, " bytes > data section of ", data_size, " bytes)"));
    }
  }
  return out;
}

namespace {

class GgufWeightFile final : public WeightFile {
 public:
  GgufWeightFile(std::unique_ptr<ByteRegion> region, GgufContents contents)
      : region_(std::move(region)), contents_(std::move(contents)) {
    infos_.reserve(contents_.tensors.size());
    for (size_t i = 0; i < contents_.tensors.size(); ++i) {
      const GgufTensor& t = contents_.tensors[i];
      infos_.push_back({t.name, t.shape, std::string(t.type.name)});
      index_.emplace(t.name, i);
    }
  }

  std::string format() const override { return "gguf"; }
  absl::StatusOr<ModelConfig> ReadModelConfig() const override {
    return ModelConfigFromGguf(*this);
  }
  const std::vector<WeightTensorInfo>& tensors() const override { return infos_; }
  bool HasTensor(const std::string& name) const override { return index_.contains(name); }

  absl::StatusOr<std::vector<float>> ReadF32(const std::string& name) const override {
    auto it = index_.find(name);
    if (it == index_.end()) return absl::NotFoundError(absl::StrCat("no tensor ", name));
    const GgufTensor& t = contents_.tensors[it->second];
    std::vector<float> out(static_cast<size_t>(t.num_elements));
    const uint8_t* src = region_->data() + contents_.data_offset + t.offset;
    absl::Status s = DequantizeGguf(t.type.name, src, t.num_bytes, t.num_elements, out.data());
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("tensor ", name, ": ", s.message()));
    return out;
  }

  std::optional<std::string> MetaString(const std::string& key) const override {
    const GgufValue* v = Find(key);
    if (v == nullptr || v->type != GgufValueType::kString) return std::nullopt;
    return v->s;
  }
  std::optional<int64_t> MetaInt(const std::string& key) const override {
    const GgufValue* v = Find(key);
    if (v == nullptr || !IsIntegerType(v->type) || v->u64_overflow) return std::nullopt;
    return v->i;
  }
  std::optional<double> MetaFloat(const std::string& key) const override {
    const GgufValue* v = Find(key);
    if (v == nullptr) return std::nullopt;
    if (v->type == GgufValueType::kF32 || v->type == GgufValueType::kF64) return v->f;
    if (IsIntegerType(v->type) && !v->u64_overflow) return static_cast<double>(v->i);
    return std::nullopt;
  }
  std::optional<std::vector<std::string>> MetaStringArray(const std::string& key) const override {
    const GgufValue* v = Find(key);
    if (v == nullptr || v->type != GgufValueType::kArray ||
        v->elem_type != GgufValueType::kString) {
      return std::nullopt;
    }
    return v->strings;
  }
  std::optional<std::vector<int64_t>> MetaIntArray(const std::string& key) const override {
    const GgufValue* v = Find(key);
    if (v == nullptr || v->type != GgufValueType::kArray || !IsIntegerType(v->elem_type) ||
        v->u64_overflow) {
      return std::nullopt;
    }
    return v->ints;
  }
  std::optional<std::vector<float>> MetaFloatArray(const std::string& key) const override {
    const GgufValue* v = Find(key);
    if (v == nullptr || v->type != GgufValueType::kArray) return std::nullopt;
    if (v->elem_type == GgufValueType::kF32 || v->elem_type == GgufValueType::kF64) {
      return std::vector<float>(v->floats.begin(), v->floats.end());
    }
    if (IsIntegerType(v->elem_type) && !v->u64_overflow) {
      return std::vector<float>(v->ints.begin(), v->ints.end());
    }
    return std::nullopt;
  }

 private:
  const GgufValue* Find(const std::string& key) const {
    auto it = contents_.metadata.find(key);
    return it == contents_.metadata.end() ? nullptr : &it->second;
  }

  std::unique_ptr<ByteRegion> region_;
  GgufContents contents_;
  std::vector<WeightTensorInfo> infos_;
  absl::flat_hash_map<std::string, size_t> index_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<WeightFile>> OpenGgufRegion(std::unique_ptr<ByteRegion> region,
                                                           std::string display_name) {
  auto contents = ParseGguf(region->data(), region->size());
  if (!contents.ok()) {
    return absl::Status(contents.status().code(),
                        absl::StrCat(display_name, ": ", contents.status().message()));
  }
  return std::unique_ptr<WeightFile>(
      new GgufWeightFile(std::move(region), std::move(contents).value()));
}

}  // namespace asynctls::weights
