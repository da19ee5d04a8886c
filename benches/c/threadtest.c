/*
 * threadtest: Hoard's threadtest (Berger et al., ASPLOS 2000), written
 * anew for remem.
 *
 *   threadtest SYSTEM THREADS ITERATIONS DIR      SYSTEM: remem | malloc
 *
 * Each of THREADS threads, ITERATIONS times: allocates OBJECTS blocks of
 * SIZE bytes (writing the first byte of each), then frees them all, in
 * allocation order. Threads start together; the figure is the wall time
 * until the last one finishes.
 *
 * Output, one line: "threadtest THREADS OPS SECONDS NS_PER_OP" where an op
 * is one allocation + one free, OPS counts all threads' ops, and NS_PER_OP
 * is wall time per op per thread (SECONDS * THREADS / OPS).
 */
#include <pthread.h>

#include "mt_sys.h"

#define OBJECTS 10000
#define SIZE 64

static int iterations;
static pthread_barrier_t barrier;

static void *worker(void *arg) {
  (void)arg;
  char **objs = malloc(OBJECTS * sizeof *objs); /* the program's own memory, not the system's */
  if (!objs) mt_die("malloc", "out of memory");
  pthread_barrier_wait(&barrier);
  for (int it = 0; it < iterations; it++) {
    for (int i = 0; i < OBJECTS; i++) {
      objs[i] = mt_alloc(SIZE);
      objs[i][0] = (char)i;
    }
    for (int i = 0; i < OBJECTS; i++) mt_free(objs[i]);
  }
  free(objs);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: threadtest remem|malloc THREADS ITERATIONS DIR\n");
    return 2;
  }
  int threads = atoi(argv[2]);
  iterations = atoi(argv[3]);
  if (threads < 1 || threads > 64 || iterations < 1) mt_die("arguments", "THREADS in 1..64, ITERATIONS >= 1");
  mt_start(argv[1], argv[4]);
  pthread_t *ts = calloc((size_t)threads, sizeof *ts);
  if (!ts) mt_die("calloc", "out of memory");
  pthread_barrier_init(&barrier, NULL, (unsigned)threads + 1);
  for (int t = 0; t < threads; t++)
    if (pthread_create(&ts[t], NULL, worker, NULL) != 0) mt_die("pthread_create", "failed");
  pthread_barrier_wait(&barrier);
  double start = mt_now();
  for (int t = 0; t < threads; t++) pthread_join(ts[t], NULL);
  double elapsed = mt_now() - start;
  free(ts);
  pthread_barrier_destroy(&barrier);
  mt_stop();
  uint64_t ops = (uint64_t)threads * (uint64_t)iterations * OBJECTS;
  printf("threadtest %d %llu %.6f %.3f\n", threads, (unsigned long long)ops, elapsed, elapsed * 1e9 * threads / (double)ops);
  return 0;
}
