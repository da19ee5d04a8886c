/*
 * cpairs: a fixed workload for instruction counts of remem's C ABI (the
 * README's callgrind figures), the C twin of remem-alloc's alloc_pairs
 * example: N pairs of remem_alloc(64) + write the first byte + remem_free,
 * or N transactions of remem_tx_begin + remem_tx_add_range(64 B) +
 * overwrite + remem_tx_commit, on a memfd heap. Only the timed function is
 * counted (--toggle-collect), so heap creation does not blur the figure.
 *
 *   cargo build --release -p remem-ffi
 *   cc -O2 -g -Iffi/include benches/c/cpairs.c -o target/release/cpairs \
 *      -Ltarget/release -Wl,-rpath,$PWD/target/release -lremem
 *   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
 *      --toggle-collect=run_pairs target/release/cpairs 1000000 pairs
 *   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
 *      --toggle-collect=run_tx target/release/cpairs 1000000 tx
 *
 * "Collected" divided by N is the instructions per pair (per transaction).
 */
#include <remem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static remem_heap *heap;

static void die(const char *what) {
  fprintf(stderr, "cpairs: %s: %s\n", what, remem_last_error());
  exit(1);
}

__attribute__((noinline)) void run_pairs(long n) {
  for (long i = 0; i < n; i++) {
    void *p;
    if (remem_alloc(heap, 64, &p) != REMEM_OK) die("remem_alloc");
    *(volatile char *)p = (char)i;
    __asm__ volatile("" : : "r"(p) : "memory");
    if (remem_free(heap, p) != REMEM_OK) die("remem_free");
  }
}

__attribute__((noinline)) void run_tx(long n, char *p) {
  for (long i = 0; i < n; i++) {
    if (remem_tx_begin(heap) != REMEM_OK || remem_tx_add_range(heap, p, 64) != REMEM_OK) die("transaction");
    memset(p, (int)i, 64);
    if (remem_tx_commit(heap) != REMEM_OK) die("remem_tx_commit");
  }
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 1000000;
  const char *what = argc > 2 ? argv[2] : "pairs";
  if (remem_create_memfd(64 << 20, 0, &heap) != REMEM_OK) die("remem_create_memfd");
  void *p;
  if (remem_alloc(heap, 64, &p) != REMEM_OK) die("remem_alloc");
  /* Warm up: the thread's first calls take the slow paths. */
  run_pairs(1000);
  run_tx(1000, p);
  if (strcmp(what, "pairs") == 0)
    run_pairs(n);
  else if (strcmp(what, "tx") == 0)
    run_tx(n, p);
  else {
    fprintf(stderr, "usage: cpairs N pairs|tx\n");
    return 2;
  }
  if (remem_close(heap) != REMEM_OK) die("remem_close");
  return 0;
}
