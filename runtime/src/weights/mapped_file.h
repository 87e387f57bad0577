// Read-only byte regions backing a weight file: a memory-mapped file (RAII munmap) or an
// in-memory copy (tests, fuzzing). Thread-safe: the bytes never change after construction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace asynctls::weights {

class ByteRegion {
 public:
  virtual ~ByteRegion() = default;
  virtual const uint8_t* data() const = 0;
  virtual size_t size() const = 0;
};

// The whole file mapped PROT_READ / MAP_PRIVATE. An empty file maps to a region of size 0.
class MappedFile final : public ByteRegion {
 public:
  // NOT_FOUND when the file does not exist, INVALID_ARGUMENT for a directory, INTERNAL when
  // mmap fails.
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile() override;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const override { return data_; }
  size_t size() const override { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

class OwnedBytes final : public ByteRegion {
 public:
  explicit OwnedBytes(std::string bytes) : bytes_(std::move(bytes)) {}
  const uint8_t* data() const override { return reinterpret_cast<const uint8_t*>(bytes_.data()); }
  size_t size() const override { return bytes_.size(); }

 private:
  std::string bytes_;
};

}  // namespace asynctls::weights
