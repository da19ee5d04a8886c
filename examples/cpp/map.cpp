// map: a std::map, a std::vector and a std::unordered_map living in a remem
// heap, hanging off its root object, reopened by a new process.
//
//   map write PATH N    create a heap file, fill the containers, close
//   map verify PATH N   reopen (another process), check every entry,
//                       change the containers, check the heap, close
//
// The containers use remem::persistent_allocator (see remem.hpp): it
// holds the heap's base address, which is the same in every process, and
// finds the open heap there on each call (remem_alloc_at(), remem_free_at()),
// so the allocator objects the containers keep inside the heap still work
// after the reopen.
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <scoped_allocator>
#include <string>
#include <unistd.h>
#include <unordered_map>
#include <vector>

#include "remem.hpp"

template <class T>
using palloc = remem::persistent_allocator<T>;

// Strings whose characters live in the heap.
using pstring = std::basic_string<char, std::char_traits<char>, palloc<char>>;

// scoped_allocator_adaptor hands the map's allocator on to the pstring
// values, so that m.emplace(k, "text") builds the string in the heap too.
using Names = std::map<std::uint64_t, pstring, std::less<std::uint64_t>,
                       std::scoped_allocator_adaptor<palloc<std::pair<const std::uint64_t, pstring>>>>;
using Squares = std::vector<std::uint64_t, palloc<std::uint64_t>>;
// std::hash<uint64_t> is the identity in libstdc++: no per-process seed.
using Index = std::unordered_map<std::uint64_t, std::uint64_t, std::hash<std::uint64_t>, std::equal_to<std::uint64_t>,
                                 palloc<std::pair<const std::uint64_t, std::uint64_t>>>;

struct Root {
  static constexpr std::uint64_t kMagic = 0x6d61707230303031;  // "mapr0001"
  std::uint64_t magic = kMagic;
  Names names;
  Squares squares;
  Index index;  // square -> number

  explicit Root(remem_heap* h)
      : names(palloc<Names::value_type>(h)), squares(palloc<std::uint64_t>(h)),
        index(16, std::hash<std::uint64_t>(), std::equal_to<std::uint64_t>(), palloc<Index::value_type>(h)) {}
};

static std::string name_of(std::uint64_t i) {
  return "entry number " + std::to_string(i) + (i % 2 ? " (odd, and long enough to leave the SSO buffer)" : "");
}

static int fail(const char* what) {
  std::fprintf(stderr, "map: %s\n", what);
  return 1;
}

static int write(const char* path, std::uint64_t n) {
  unlink(path);
  remem::heap heap = remem::heap::create(path, 64 << 20);
  Root& r = heap.root<Root>(heap.get());
  for (std::uint64_t i = 0; i < n; i++) {
    r.names.emplace(i, name_of(i).c_str());
    r.squares.push_back(i * i);
    r.index[i * i] = i;
  }
  // A container that is not itself in the heap, using the plain allocator.
  std::vector<int, remem::allocator<int>> scratch(heap.alloc<int>());
  for (int i = 0; i < 10000; i++) scratch.push_back(i);
  scratch.clear();
  scratch.shrink_to_fit();
  std::printf("map write: %" PRIu64 " entries in a std::map, std::vector and std::unordered_map in %s\n", n, path);
  heap.close();
  return 0;
}

static int verify(const char* path, std::uint64_t n) {
  remem::heap heap = remem::heap::open(path);
  void* p = nullptr;
  remem::check(remem_root(heap.get(), &p));
  if (!p) return fail("the heap has no root");
  Root& r = *static_cast<Root*>(p);
  if (r.magic != Root::kMagic) return fail("the root is not a Root");
  if (r.names.size() != n || r.squares.size() != n || r.index.size() != n) return fail("wrong sizes");
  std::uint64_t i = 0;
  for (const auto& [k, v] : r.names) {
    if (k != i || v != name_of(i).c_str()) return fail("std::map entry differs");
    if (r.squares[i] != i * i) return fail("std::vector entry differs");
    auto it = r.index.find(i * i);
    if (it == r.index.end() || it->second != i) return fail("std::unordered_map entry differs");
    i++;
  }
  // The nodes and the characters of the strings are in the heap.
  remem_heap* where = nullptr;
  const pstring& odd = r.names.at(1);
  if (remem_heap_at(&odd, &where) != REMEM_OK || remem_heap_at(odd.data(), &where) != REMEM_OK ||
      where != heap.get() || remem_heap_at(r.squares.data(), &where) != REMEM_OK)
    return fail("the containers' memory is not in the heap");
  // The containers still allocate and free after the reopen.
  for (std::uint64_t k = 0; k < n; k += 2) r.names.erase(k);
  for (std::uint64_t k = n; k < n + 100; k++) r.names.emplace(k, name_of(k).c_str());
  r.squares.resize(n / 2);
  r.squares.shrink_to_fit();
  r.index.clear();
  r.index.rehash(0);
  if (r.names.size() != n / 2 + 100 || r.names.begin()->second != name_of(1).c_str())
    return fail("std::map after changes");
  remem_check_report rep;
  remem::check(remem_check(heap.get(), &rep));
  std::printf("map verify: all %" PRIu64 " entries of %s reopened intact and the containers still work; "
              "remem_check ok (%" PRIu64 " blocks)\n",
              n, path, rep.allocated_blocks + rep.large_runs);
  heap.close();
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 4) return fail("usage: map write|verify PATH N");
  std::uint64_t n = std::strtoull(argv[3], nullptr, 10);
  try {
    if (std::strcmp(argv[1], "write") == 0) return write(argv[2], n);
    if (std::strcmp(argv[1], "verify") == 0) return verify(argv[2], n);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "map: %s\n", e.what());
    return 1;
  }
  return fail("usage: map write|verify PATH N");
}
