/*
 * remem: a recoverable heap for databases -- C++ adapters over remem.h.
 * Header-only; link libremem as for C (pkg-config --cflags --libs remem).
 * Needs C++17.
 *
 * - remem::heap             RAII owner of a remem_heap* (closes it);
 * - remem::error            exception carrying a remem_status and message;
 * - remem::allocator<T>     allocator for containers that live OUTSIDE the
 *                           heap (on the stack, in malloc memory) but keep
 *                           their elements in it, while the handle is open;
 * - remem::persistent_allocator<T>
 *                           allocator for containers that themselves live
 *                           IN the heap (hanging off the root object) and
 *                           must work again after the heap is closed and
 *                           reopened, in this process or another one.
 *
 * Why two allocators. A standard container stores its allocator object
 * inside itself. A container kept in the heap therefore keeps its
 * allocator across a close and reopen, when the remem_heap* it held is
 * stale (handles are never reused, and a handle from another process
 * means nothing here). persistent_allocator stores the heap's base
 * address instead, which is the same in every process that opens the
 * heap (heaps are mapped at a fixed address), and allocates and frees
 * with remem_alloc_at(base, ...) and remem_free_at(base, ...), which find
 * the open heap there (a table lookup of a few loads, no lock) inside the
 * one call. While
 * no heap is open at that address, allocation throws remem::alloc_error
 * and deallocation does nothing (the block stays allocated in the
 * image). allocator<T> holds the remem_heap* itself and is the cheaper
 * choice for everything that does not outlive the handle.
 *
 * Rules for data kept in a heap across processes:
 * - Raw pointers into the heap stay valid (fixed address); pointers to
 *   anything else (the stack, malloc memory, statics, functions, vtables)
 *   do not. So: no polymorphic types, no std::function, no std::string or
 *   container that uses std::allocator, no hash function seeded per
 *   process. std::hash of integers is fine.
 * - The program that reopens the heap must be built with the same
 *   standard library and the same type definitions (container layouts).
 * - Plain container updates are not failure-atomic: a heap with an image
 *   file is saved on remem_close(), so after a crash it holds what it held
 *   at the last close; a memfd heap is only as consistent as the last
 *   update that completed. Use remem transactions (see remem.h) for
 *   failure-atomic updates of your own structures.
 */
#ifndef REMEM_HPP
#define REMEM_HPP

#include "remem.h"

#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace remem {

/** A failed remem call: its status and remem_last_error() at the time. */
class error : public std::runtime_error {
 public:
  error(remem_status status, const std::string& what) : std::runtime_error(what), status_(status) {}
  remem_status status() const noexcept { return status_; }

 private:
  remem_status status_;
};

/** Message for status `s` of the call that just failed on this thread. */
inline std::string describe(remem_status s) {
  return std::string(remem_status_name(s)) + ": " + remem_last_error();
}

/** Throws remem::error unless `s` is REMEM_OK. */
inline void check(remem_status s) {
  if (s != REMEM_OK) throw error(s, describe(s));
}

/** An allocation from a heap failed (a std::bad_alloc, with remem's reason). */
class alloc_error : public std::bad_alloc {
 public:
  alloc_error(remem_status status, std::string what) : status_(status), what_(std::move(what)) {}
  const char* what() const noexcept override { return what_.c_str(); }
  remem_status status() const noexcept { return status_; }

 private:
  remem_status status_;
  std::string what_;
};

namespace detail {

inline void* allocate(remem_heap* h, std::size_t n, std::size_t size, std::size_t align) {
  if (n > std::numeric_limits<std::size_t>::max() / size) throw std::bad_array_new_length();
  std::size_t bytes = n * size;
  if (bytes == 0) bytes = 1;
  void* p = nullptr;
  remem_status s = remem_alloc_aligned(h, bytes, align < 16 ? 16 : align, &p);
  if (s != REMEM_OK) throw alloc_error(s, describe(s));
  return p;
}

inline std::uintptr_t base_of(remem_heap* h) {
  remem_heap_stats st;
  check(remem_stats(h, &st));
  return reinterpret_cast<std::uintptr_t>(st.base);
}

}  // namespace detail

/**
 * Allocator for containers that are not themselves stored in the heap,
 * while the handle it holds stays open. Equal iff same handle.
 */
template <class T>
class allocator {
 public:
  using value_type = T;
  using propagate_on_container_copy_assignment = std::true_type;
  using propagate_on_container_move_assignment = std::true_type;
  using propagate_on_container_swap = std::true_type;
  using is_always_equal = std::false_type;

  explicit allocator(remem_heap* h) noexcept : heap_(h) {}
  template <class U>
  allocator(const allocator<U>& o) noexcept : heap_(o.heap()) {}

  T* allocate(std::size_t n) { return static_cast<T*>(detail::allocate(heap_, n, sizeof(T), alignof(T))); }
  /** Frees; a failure (handle closed meanwhile) leaves the block allocated. */
  void deallocate(T* p, std::size_t) noexcept { (void)remem_free(heap_, p); }

  remem_heap* heap() const noexcept { return heap_; }

  template <class U>
  friend bool operator==(const allocator& a, const allocator<U>& b) noexcept {
    return a.heap() == b.heap();
  }
  template <class U>
  friend bool operator!=(const allocator& a, const allocator<U>& b) noexcept {
    return !(a == b);
  }

 private:
  remem_heap* heap_;
};

/**
 * Allocator for containers stored in the heap: holds the heap's base
 * address (valid in every process) and finds the open heap there on
 * each call (remem_alloc_at(), remem_free_at()). Equal iff same heap.
 */
template <class T>
class persistent_allocator {
 public:
  using value_type = T;
  using propagate_on_container_copy_assignment = std::true_type;
  using propagate_on_container_move_assignment = std::true_type;
  using propagate_on_container_swap = std::true_type;
  using is_always_equal = std::false_type;

  /** For the heap behind `h` (open now; it may be closed and reopened later). */
  explicit persistent_allocator(remem_heap* h) : base_(detail::base_of(h)) {}
  template <class U>
  persistent_allocator(const persistent_allocator<U>& o) noexcept : base_(o.base()) {}

  T* allocate(std::size_t n) {
    if (n > std::numeric_limits<std::size_t>::max() / sizeof(T)) throw std::bad_array_new_length();
    std::size_t bytes = n * sizeof(T);
    if (bytes == 0) bytes = 1;
    void* p = nullptr;
    remem_status s =
        remem_alloc_at(reinterpret_cast<const void*>(base_), bytes, alignof(T) < 16 ? 16 : alignof(T), &p);
    if (s != REMEM_OK) throw alloc_error(s, describe(s));
    return static_cast<T*>(p);
  }
  /** Frees; does nothing while no heap is open at the base address. */
  void deallocate(T* p, std::size_t) noexcept { (void)remem_free_at(reinterpret_cast<const void*>(base_), p); }

  /** The heap's base address. */
  std::uintptr_t base() const noexcept { return base_; }

  template <class U>
  friend bool operator==(const persistent_allocator& a, const persistent_allocator<U>& b) noexcept {
    return a.base() == b.base();
  }
  template <class U>
  friend bool operator!=(const persistent_allocator& a, const persistent_allocator<U>& b) noexcept {
    return !(a == b);
  }

 private:
  std::uintptr_t base_;
};

/** Owns an open heap; the destructor closes it (call close() to see errors). */
class heap {
 public:
  static heap create(const char* path, std::uint64_t size, std::uint64_t base = 0) {
    remem_heap* h = nullptr;
    check(remem_create(path, size, base, &h));
    return heap(h);
  }
  static heap open(const char* path) {
    remem_heap* h = nullptr;
    check(remem_open(path, &h));
    return heap(h);
  }
  static heap create_memfd(std::uint64_t size, std::uint64_t base = 0) {
    remem_heap* h = nullptr;
    check(remem_create_memfd(size, base, &h));
    return heap(h);
  }
  /** Attaches the heap held by memfd `fd` (not consumed). */
  static heap attach(int fd) {
    remem_heap* h = nullptr;
    check(remem_attach(fd, &h));
    return heap(h);
  }

  explicit heap(remem_heap* h) noexcept : h_(h) {}
  heap(heap&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  heap& operator=(heap&& o) noexcept {
    if (this != &o) {
      (void)remem_close(h_);
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  heap(const heap&) = delete;
  heap& operator=(const heap&) = delete;
  ~heap() { (void)remem_close(h_); }

  /** Saves (file heaps) and closes; throws remem::error if saving failed. */
  void close() { check(remem_close(std::exchange(h_, nullptr))); }

  remem_heap* get() const noexcept { return h_; }

  template <class T>
  allocator<T> alloc() const noexcept {
    return allocator<T>(h_);
  }
  template <class T>
  persistent_allocator<T> persistent_alloc() const {
    return persistent_allocator<T>(h_);
  }

  /**
   * The root object as a T. When the heap has no root yet, constructs a T
   * from `args` in a new block and then makes it the root, so the root is
   * never a half-built T (a crash in between leaks the block; the next
   * open builds the root again). The heap does not know the root's type:
   * every program that opens the heap must agree on T. Not thread-safe
   * against another thread creating the root at the same time.
   */
  template <class T, class... Args>
  T& root(Args&&... args) {
    void* p = nullptr;
    check(remem_root(h_, &p));
    if (p) return *static_cast<T*>(p);
    p = detail::allocate(h_, 1, sizeof(T), alignof(T));
    T* t;
    try {
      t = ::new (p) T(std::forward<Args>(args)...);
    } catch (...) {
      (void)remem_free(h_, p);
      throw;
    }
    check(remem_set_root(h_, t));
    return *t;
  }

 private:
  remem_heap* h_;
};

}  // namespace remem

#endif  // REMEM_HPP
