/*
 * The allocator under test for the multi-threaded C benchmarks (larson.c,
 * threadtest.c): remem through libremem and remem.h, or whichever malloc
 * the program was linked with (built plain: glibc's; with -ljemalloc or
 * -lmimalloc: Debian's shared libraries, which replace malloc). Every call
 * goes through the PLT, as libremem's do.
 *
 * remem runs as a user gets it: remem_create() with its defaults (fast
 * write tracking, a background flush to the baseline file every second).
 */
#ifndef MT_SYS_H
#define MT_SYS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "remem.h"

#define MT_HEAP_SIZE (1ull << 30)

static remem_heap *mt_heap;
static int mt_remem;
static char mt_path[4096];

static void mt_die(const char *what, const char *why) {
  fprintf(stderr, "mt: %s: %s\n", what, why);
  exit(1);
}

/* Starts system `name` ("remem" or "malloc"); `dir` holds remem's baseline. */
static void mt_start(const char *name, const char *dir) {
  if (strcmp(name, "remem") == 0) {
    mt_remem = 1;
    snprintf(mt_path, sizeof mt_path, "%s/mt-%ld.heap", dir, (long)getpid());
    if (remem_create(mt_path, MT_HEAP_SIZE, 0, &mt_heap) != REMEM_OK) mt_die("remem_create", remem_last_error());
  } else if (strcmp(name, "malloc") != 0) {
    mt_die(name, "unknown system (remem or malloc)");
  }
}

static void mt_stop(void) {
  if (!mt_remem) return;
  if (remem_close(mt_heap) != REMEM_OK) mt_die("remem_close", remem_last_error());
  char lock[4200];
  snprintf(lock, sizeof lock, "%s.lock", mt_path);
  unlink(mt_path);
  unlink(lock);
}

static inline void *mt_alloc(size_t size) {
  if (mt_remem) {
    void *p;
    remem_status s = remem_alloc(mt_heap, size, &p);
    if (__builtin_expect(s != REMEM_OK, 0)) mt_die("remem_alloc", remem_last_error());
    return p;
  }
  void *p = malloc(size);
  if (__builtin_expect(p == NULL, 0)) mt_die("malloc", "out of memory");
  return p;
}

static inline void mt_free(void *p) {
  if (mt_remem) {
    remem_status s = remem_free(mt_heap, p);
    if (__builtin_expect(s != REMEM_OK, 0)) mt_die("remem_free", remem_last_error());
    return;
  }
  free(p);
}

static double mt_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline uint64_t mt_rand(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

/* Uniform in 0..n (multiply-shift on the high 32 bits). */
static inline uint64_t mt_below(uint64_t *s, uint64_t n) { return ((mt_rand(s) >> 32) * n) >> 32; }

#endif
