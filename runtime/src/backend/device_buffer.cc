#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "asynctls/runtime/backend.h"

namespace asynctls {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    owner_ = o.owner_;
    data_ = o.data_;
    bytes_ = o.bytes_;
    o.owner_ = nullptr;
    o.data_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

absl::StatusOr<HostBuffer> Backend::AllocateHost(size_t bytes) {
  void* data = std::malloc(bytes == 0 ? 1 : bytes);
  if (data == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("host allocation of ", bytes, " bytes failed"));
  }
  return HostBuffer(data, bytes, &std::free);
}

void DeviceBuffer::Reset() {
  if (owner_ && data_) owner_->Free(data_);
  owner_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

}  // namespace asynctls
