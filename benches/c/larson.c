/*
 * larson: the server workload of Larson and Krishnan ("Memory allocation
 * for long-running server applications", ISMM 1998), as allocator
 * benchmarks run it (Hoard, mimalloc-bench), written anew for remem.
 *
 *   larson SYSTEM THREADS SECONDS DIR      SYSTEM: remem | malloc
 *
 * Each of THREADS workers owns an array of SLOTS blocks, filled by the main
 * thread before the clock starts. A worker repeatedly picks a random slot,
 * frees its block and allocates a new one of a random size in
 * MIN_SIZE..MAX_SIZE bytes (writing its first byte). After ROUNDS such
 * steps it hands its array to a new thread, which it starts, and exits:
 * the blocks it allocated are freed by the next thread, so frees cross
 * threads all the time (and the first ones free the main thread's blocks).
 * When SECONDS have passed, every chain finishes its round and stops.
 *
 * Output, one line: "larson THREADS OPS SECONDS NS_PER_OP" where an op is
 * one free + one allocation, NS_PER_OP is wall time per op per thread
 * (SECONDS * THREADS / OPS), and SECONDS the measured wall time.
 */
#include <pthread.h>
#include <stdatomic.h>

#include "mt_sys.h"

#define SLOTS 1000
#define MIN_SIZE 16
#define MAX_SIZE 128
#define ROUNDS 10000

struct chain {
  void *slots[SLOTS];
  uint64_t seed;
  uint64_t ops;
};

static atomic_int stop_flag;
static atomic_int running;

static void *worker(void *arg);

static void hand_over(struct chain *c) {
  pthread_t t;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  if (pthread_create(&t, &attr, worker, c) != 0) mt_die("pthread_create", "failed");
  pthread_attr_destroy(&attr);
}

static void *worker(void *arg) {
  struct chain *c = arg;
  uint64_t s = c->seed;
  for (int i = 0; i < ROUNDS; i++) {
    uint64_t j = mt_below(&s, SLOTS);
    mt_free(c->slots[j]);
    size_t size = MIN_SIZE + mt_below(&s, MAX_SIZE - MIN_SIZE + 1);
    char *p = mt_alloc(size);
    p[0] = (char)i;
    c->slots[j] = p;
  }
  c->seed = s;
  c->ops += ROUNDS;
  if (atomic_load(&stop_flag))
    atomic_fetch_sub(&running, 1);
  else
    hand_over(c);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: larson remem|malloc THREADS SECONDS DIR\n");
    return 2;
  }
  int threads = atoi(argv[2]);
  double seconds = atof(argv[3]);
  if (threads < 1 || threads > 64 || !(seconds > 0)) mt_die("arguments", "THREADS in 1..64, SECONDS > 0");
  mt_start(argv[1], argv[4]);
  struct chain *chains = calloc((size_t)threads, sizeof *chains);
  if (!chains) mt_die("calloc", "out of memory");
  for (int t = 0; t < threads; t++) {
    chains[t].seed = 0x9E3779B97F4A7C15ull + (uint64_t)t;
    uint64_t s = chains[t].seed;
    for (int j = 0; j < SLOTS; j++) {
      char *p = mt_alloc(MIN_SIZE + mt_below(&s, MAX_SIZE - MIN_SIZE + 1));
      p[0] = 1;
      chains[t].slots[j] = p;
    }
  }
  atomic_store(&running, threads);
  double start = mt_now();
  for (int t = 0; t < threads; t++) hand_over(&chains[t]);
  struct timespec nap = {0, 1000000};
  while (mt_now() - start < seconds) nanosleep(&nap, NULL);
  atomic_store(&stop_flag, 1);
  while (atomic_load(&running) > 0) nanosleep(&nap, NULL);
  double elapsed = mt_now() - start;
  uint64_t ops = 0;
  for (int t = 0; t < threads; t++) {
    ops += chains[t].ops;
    for (int j = 0; j < SLOTS; j++) mt_free(chains[t].slots[j]);
  }
  free(chains);
  mt_stop();
  printf("larson %d %llu %.6f %.3f\n", threads, (unsigned long long)ops, elapsed, elapsed * 1e9 * threads / (double)ops);
  return 0;
}
