// Per-thread scratch buffers that keep their memory from one call to the next (ScratchVector).
//
// The workspaces of the CPU routes are megabytes (imagenet-stem-2024: 15 MB per thread in the backward). A fresh buffer
// that large comes from mmap, and every page of it faults on first touch: measured on the 2-core AMD
// EPYC, half of that layer's forward time was spent in the kernel, zeroing pages. Here a thread keeps
// the large blocks its workspaces free, and its next workspace takes them back: mapped, warm, no fault.
// A vector still value-initialises what it resizes (the routes rely on zeros in gaps and margins).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>
#include <utility>
#include <vector>

namespace pushpull {
namespace cpu {
namespace scratch {

// Blocks below this size come from the heap without a fault anyway: not cached.
constexpr std::size_t kMinCachedBytes = 64 * 1024;
// At most this much memory is kept per thread (the oldest blocks go first; larger blocks are freed).
constexpr std::size_t kMaxCachedBytes = std::size_t(64) << 20;
// Every block starts with a header holding its size; data follows it, 64-byte aligned.
constexpr std::size_t kHeader = 64;

class BlockCache {
 public:
  BlockCache() = default;
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;
  ~BlockCache() {
    for (const auto& block : blocks_) std::free(block.first);
  }

  // Data of at least `bytes`: the smallest cached block that fits and is at most twice as large, else new.
  void* take(std::size_t bytes) {
    std::size_t best = blocks_.size();
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const std::size_t size = blocks_[i].second;
      if (size >= bytes && size <= 2 * bytes && (best == blocks_.size() || size < blocks_[best].second)) best = i;
    }
    if (best == blocks_.size()) return allocate(bytes);
    char* block = static_cast<char*>(blocks_[best].first);
    cached_ -= blocks_[best].second;
    blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(best));
    return block + kHeader;
  }

  // Keeps the block of `data` for this thread's next take (or frees it: small, or over the limit).
  void give(void* data) {
    char* block = static_cast<char*>(data) - kHeader;
    const std::size_t size = *reinterpret_cast<std::size_t*>(block);
    if (size < kMinCachedBytes || size > kMaxCachedBytes) return std::free(block);
    try {
      blocks_.emplace_back(block, size);
    } catch (...) {  // no memory for the list: the block is freed instead
      return std::free(block);
    }
    cached_ += size;
    while (cached_ > kMaxCachedBytes) {
      cached_ -= blocks_.front().second;
      std::free(blocks_.front().first);
      blocks_.erase(blocks_.begin());
    }
  }

 private:
  static void* allocate(std::size_t bytes) {
    void* block = nullptr;
    if (posix_memalign(&block, kHeader, kHeader + bytes) != 0) throw std::bad_alloc();
    *static_cast<std::size_t*>(block) = bytes;
    return static_cast<char*>(block) + kHeader;
  }

  std::vector<std::pair<void*, std::size_t>> blocks_;  // (block, its data size), oldest first
  std::size_t cached_ = 0;
};

inline BlockCache& thread_cache() {
  thread_local BlockCache cache;
  return cache;
}

// A std::allocator that takes from and gives back to the calling thread's cache.
template <typename T>
struct Allocator {
  using value_type = T;
  Allocator() = default;
  template <typename U>
  Allocator(const Allocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(thread_cache().take(n * sizeof(T))); }
  void deallocate(T* p, std::size_t) noexcept { thread_cache().give(p); }
  template <typename U>
  bool operator==(const Allocator<U>&) const noexcept {
    return true;  // any thread's cache can take any block back (the header says its size)
  }
  template <typename U>
  bool operator!=(const Allocator<U>&) const noexcept {
    return false;
  }
};

}  // namespace scratch

// A workspace buffer: a std::vector whose memory is reused by the thread's next workspace.
template <typename T>
using ScratchVector = std::vector<T, scratch::Allocator<T>>;

}  // namespace cpu
}  // namespace pushpull
