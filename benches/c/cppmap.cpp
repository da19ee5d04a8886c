/*
 * cppmap: std::map<uint64_t, uint64_t> as a C++ program uses it, with its
 * nodes from std::allocator or from a remem heap through remem.hpp.
 * `remem-bench cpp` builds and runs it; it can also be run by hand.
 *
 *   cppmap KEYS SEED DIR std|remem|remem_persistent
 *
 * One repetition of one system per run: inserts KEYS distinct random keys
 * (xorshift64 from SEED), finds every key in insertion order, then in
 * reverse order, then erases them in insertion order. Output: one line per
 * case, "CASE NS_PER_OP".
 *
 * `std` is std::allocator, i.e. whichever malloc the program was linked
 * with: glibc's, or jemalloc's when built with -ljemalloc (reported as
 * `jemalloc`). `remem` is remem::allocator (holds the heap handle);
 * `remem_persistent` is remem::persistent_allocator (holds the heap's base
 * address and allocates and frees with remem_alloc_at() and remem_free_at(),
 * which find the heap by that address inside the call). The heap is made with remem_create() and its defaults (fast write
 * tracking, background flush every second), its file in DIR.
 */
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "remem.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using Value = std::pair<const std::uint64_t, std::uint64_t>;

std::uint64_t xorshift(std::uint64_t& s) {
  std::uint64_t x = s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return s = x;
}

double ns_per(Clock::time_point t0, std::size_t n) {
  return std::chrono::duration<double, std::nano>(Clock::now() - t0).count() / static_cast<double>(n);
}

template <class Alloc>
void run(const std::vector<std::uint64_t>& keys, const Alloc& alloc) {
  std::map<std::uint64_t, std::uint64_t, std::less<std::uint64_t>, Alloc> m(alloc);
  const std::size_t n = keys.size();

  auto t0 = Clock::now();
  for (std::size_t i = 0; i < n; i++) m.emplace(keys[i], i);
  std::printf("map_insert %.2f\n", ns_per(t0, n));

  std::uint64_t sum = 0;
  t0 = Clock::now();
  for (std::size_t i = 0; i < n; i++) sum += m.find(keys[i])->second;
  std::printf("map_find_insert_order %.2f\n", ns_per(t0, n));

  t0 = Clock::now();
  for (std::size_t i = n; i-- > 0;) sum += m.find(keys[i])->second;
  std::printf("map_find_reverse %.2f\n", ns_per(t0, n));

  t0 = Clock::now();
  for (std::size_t i = 0; i < n; i++) m.erase(keys[i]);
  std::printf("map_erase %.2f\n", ns_per(t0, n));

  if (sum != static_cast<std::uint64_t>(n) * (n - 1) || !m.empty()) {
    std::fprintf(stderr, "cppmap: the map lost keys\n");
    std::exit(1);
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: cppmap KEYS SEED DIR std|remem|remem_persistent\n");
    return 2;
  }
  const std::size_t n = std::strtoull(argv[1], nullptr, 10);
  std::uint64_t s = std::strtoull(argv[2], nullptr, 10) | 1;
  const std::string dir = argv[3], system = argv[4];
  if (n == 0) return 2;
  std::vector<std::uint64_t> keys(n);
  for (auto& k : keys) k = xorshift(s); /* distinct: xorshift64 is a bijection */

  try {
    if (system == "std") {
      run(keys, std::allocator<Value>());
      return 0;
    }
    if (system != "remem" && system != "remem_persistent") {
      std::fprintf(stderr, "cppmap: unknown system %s\n", system.c_str());
      return 2;
    }
    const std::string path = dir + "/cppmap-" + std::to_string(getpid()) + ".heap";
    unlink(path.c_str());
    {
      remem::heap h = remem::heap::create(path.c_str(), 1ull << 30);
      if (system == "remem")
        run(keys, h.alloc<Value>());
      else
        run(keys, h.persistent_alloc<Value>());
      h.close();
    }
    unlink(path.c_str());
    unlink((path + ".lock").c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cppmap: %s\n", e.what());
    return 1;
  }
  return 0;
}
