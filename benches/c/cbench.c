/*
 * cbench: remem as a C program sees it (libremem.so through remem.h)
 * against glibc, jemalloc, mimalloc and PMDK libpmemobj, in one process.
 * `remem-bench c` builds and runs it; it can also be run by hand.
 *
 *   cbench alloc_free_64 THREADS REP_MS DIR remem|malloc
 *   cbench tx_update_64  THREADS REP_MS DIR remem|pmdk
 *   cbench kv            KEYS    SEED   DIR remem|pmdk
 *
 * One repetition of one system per run; output: one line per case,
 * "CASE NS_PER_OP". `remem-bench c` runs the repetitions, the systems
 * taking turns within each.
 *
 * remem runs as a user gets it: remem_create() with its defaults (fast
 * write tracking, background flush to the baseline file in DIR every
 * second). PMDK's pool lives on /dev/shm and is treated as persistent
 * memory (PMEM_IS_PMEM_FORCE=1, set by the caller): each commit flushes
 * its cache lines and fences. `malloc` is whichever malloc the program
 * was linked with, the way C programs use jemalloc and mimalloc: built
 * plain it is glibc's, built with -ljemalloc or -lmimalloc (Debian's
 * shared libraries, which replace malloc) it is theirs. Every call goes
 * through the PLT, as libremem's do.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <libpmemobj.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "remem.h"

#define HEAP_SIZE (1ull << 30)
#define POOL_SIZE (1ull << 30)
#define BATCH 256
#define VALUE 64

static void die(const char *fmt, const char *a, const char *b) {
  fprintf(stderr, "cbench: ");
  fprintf(stderr, fmt, a, b);
  fprintf(stderr, "\n");
  exit(1);
}

static void check(remem_status s, const char *what) {
  if (s != REMEM_OK) die("%s: %s", what, remem_last_error());
}

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Keeps the compiler from removing a malloc/free pair. */
static inline void escape(void *p) { __asm__ volatile("" : : "r"(p) : "memory"); }

static inline uint64_t xorshift(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

/* ------------------------------------------------------------- systems */

enum sys { REMEM, MALLOC, PMDK };
static const char *const NAMES[] = {"remem", "malloc", "pmdk"};

static remem_heap *heap;
static PMEMobjpool *pop;
static char heap_path[4096], pool_path[4096];

static enum sys parse_sys(const char *name) {
  for (int i = 0; i <= PMDK; i++)
    if (strcmp(name, NAMES[i]) == 0) return (enum sys)i;
  die("unknown system %s%s", name, "");
  return REMEM;
}

static void open_sys(enum sys s, const char *dir) {
  if (s == REMEM) {
    snprintf(heap_path, sizeof heap_path, "%s/cbench-%d.heap", dir, (int)getpid());
    unlink(heap_path);
    check(remem_create(heap_path, HEAP_SIZE, 0, &heap), "remem_create");
  } else if (s == PMDK) {
    snprintf(pool_path, sizeof pool_path, "/dev/shm/cbench-%d.pmemobj", (int)getpid());
    unlink(pool_path);
    pop = pmemobj_create(pool_path, "cbench", POOL_SIZE, 0600);
    if (!pop) die("pmemobj_create(%s): %s", pool_path, pmemobj_errormsg());
  }
}

static void close_sys(enum sys s) {
  if (s == REMEM) {
    check(remem_close(heap), "remem_close");
    heap = NULL;
    char lock[4200];
    snprintf(lock, sizeof lock, "%s.lock", heap_path);
    unlink(heap_path);
    unlink(lock);
  } else if (s == PMDK) {
    pmemobj_close(pop);
    pop = NULL;
    unlink(pool_path);
  }
}

/* --------------------------------------------------- timed thread loops */

struct run {
  enum sys sys;
  int threads;
  double rep_ns;
  pthread_barrier_t start;
  double ns[64];
};

struct worker {
  struct run *run;
  int index;
};

static inline void alloc_free_one(enum sys s, uint64_t i) {
  void *p = NULL;
  if (s == REMEM) {
    if (remem_alloc(heap, 64, &p) != REMEM_OK) die("remem_alloc: %s%s", remem_last_error(), "");
    *(volatile char *)p = (char)i;
    escape(p);
    if (remem_free(heap, p) != REMEM_OK) die("remem_free: %s%s", remem_last_error(), "");
  } else {
    p = malloc(64);
    if (!p) die("malloc failed%s%s", "", "");
    *(volatile char *)p = (char)i;
    escape(p);
    free(p);
  }
}

static void *alloc_free_thread(void *arg) {
  struct worker *w = arg;
  struct run *r = w->run;
  enum sys s = r->sys;
  for (uint64_t i = 0; i < 16 * BATCH; i++) alloc_free_one(s, i);
  pthread_barrier_wait(&r->start);
  double t0 = now_ns(), el;
  uint64_t ops = 0;
  do {
    for (int i = 0; i < BATCH; i++) alloc_free_one(s, ops + i);
    ops += BATCH;
    el = now_ns() - t0;
  } while (el < r->rep_ns);
  r->ns[w->index] = el / (double)ops;
  return NULL;
}

static inline void tx_update_one(enum sys s, void *p, uint64_t i) {
  if (s == REMEM) {
    if (remem_tx_begin(heap) != REMEM_OK || remem_tx_add_range(heap, p, VALUE) != REMEM_OK)
      die("remem transaction: %s%s", remem_last_error(), "");
    memset(p, (int)i, VALUE);
    if (remem_tx_commit(heap) != REMEM_OK) die("remem_tx_commit: %s%s", remem_last_error(), "");
  } else {
    if (pmemobj_tx_begin(pop, NULL, TX_PARAM_NONE) != 0) die("pmemobj_tx_begin: %s%s", pmemobj_errormsg(), "");
    if (pmemobj_tx_add_range_direct(p, VALUE) != 0) die("pmemobj_tx_add_range_direct: %s%s", pmemobj_errormsg(), "");
    memset(p, (int)i, VALUE);
    pmemobj_tx_commit();
    if (pmemobj_tx_end() != 0) die("pmemobj_tx_end: %s%s", pmemobj_errormsg(), "");
  }
}

static void *tx_update_thread(void *arg) {
  struct worker *w = arg;
  struct run *r = w->run;
  enum sys s = r->sys;
  void *p = NULL;
  PMEMoid oid = OID_NULL;
  if (s == REMEM) {
    check(remem_alloc(heap, VALUE, &p), "remem_alloc");
  } else {
    if (pmemobj_zalloc(pop, &oid, VALUE, 0) != 0) die("pmemobj_zalloc: %s%s", pmemobj_errormsg(), "");
    p = pmemobj_direct(oid);
  }
  for (uint64_t i = 0; i < 16 * BATCH; i++) tx_update_one(s, p, i);
  pthread_barrier_wait(&r->start);
  double t0 = now_ns(), el;
  uint64_t ops = 0;
  do {
    for (int i = 0; i < BATCH; i++) tx_update_one(s, p, ops + i);
    ops += BATCH;
    el = now_ns() - t0;
  } while (el < r->rep_ns);
  r->ns[w->index] = el / (double)ops;
  if (s == REMEM)
    check(remem_free(heap, p), "remem_free");
  else
    pmemobj_free(&oid);
  return NULL;
}

static double run_threads(struct run *r, void *(*fn)(void *)) {
  pthread_t t[64];
  struct worker w[64];
  pthread_barrier_init(&r->start, NULL, (unsigned)r->threads);
  for (int i = 0; i < r->threads; i++) {
    w[i] = (struct worker){r, i};
    if (pthread_create(&t[i], NULL, fn, &w[i]) != 0) die("pthread_create failed%s%s", "", "");
  }
  double sum = 0;
  for (int i = 0; i < r->threads; i++) {
    pthread_join(t[i], NULL);
    sum += r->ns[i];
  }
  pthread_barrier_destroy(&r->start);
  return sum / r->threads;
}

/* --------------------------------------------------------- the hash map */

/*
 * The same chained hash map on both systems: a bucket array of 64-bit
 * references and entries {key, next, 64 B value}. A reference is a
 * pointer in remem (heaps sit at a fixed address) and an offset from the
 * pool's base in PMDK (what a PMEMoid holds), turned into an address by
 * one addition.
 */
struct entry {
  uint64_t key;
  uint64_t next;
  unsigned char value[VALUE];
};

struct kv {
  enum sys sys;
  uint64_t mask;
  uint64_t *buckets;
};

static inline struct entry *deref(const struct kv *m, uint64_t ref) {
  if (!ref) return NULL;
  return (struct entry *)(m->sys == REMEM ? (uintptr_t)ref : (uintptr_t)pop + ref);
}

static inline uint64_t *bucket(const struct kv *m, uint64_t key) {
  return &m->buckets[(key * 0x9E3779B97F4A7C15ull) >> 20 & m->mask];
}

static inline struct entry *find(const struct kv *m, uint64_t key) {
  for (struct entry *e = deref(m, *bucket(m, key)); e; e = deref(m, e->next))
    if (e->key == key) return e;
  return NULL;
}

static void kv_open(struct kv *m, enum sys s, uint64_t keys) {
  uint64_t n = 1;
  while (n < keys) n <<= 1;
  m->sys = s;
  m->mask = n - 1;
  if (s == REMEM) {
    void *b;
    check(remem_alloc_zeroed(heap, n * 8, &b), "remem_alloc_zeroed(buckets)");
    m->buckets = b;
  } else {
    PMEMoid oid;
    if (pmemobj_zalloc(pop, &oid, n * 8, 0) != 0) die("pmemobj_zalloc(buckets): %s%s", pmemobj_errormsg(), "");
    m->buckets = pmemobj_direct(oid);
  }
}

/* One transaction: insert `key` (absent) with a value of `byte`s. */
static void kv_insert(struct kv *m, uint64_t key, int byte) {
  uint64_t *b = bucket(m, key);
  struct entry *e;
  uint64_t ref;
  if (m->sys == REMEM) {
    check(remem_tx_begin(heap), "remem_tx_begin");
    void *p;
    check(remem_tx_alloc(heap, sizeof *e, &p), "remem_tx_alloc");
    e = p;
    ref = (uintptr_t)p;
    check(remem_tx_add_range(heap, b, sizeof *b), "remem_tx_add_range");
  } else {
    if (pmemobj_tx_begin(pop, NULL, TX_PARAM_NONE) != 0) die("pmemobj_tx_begin: %s%s", pmemobj_errormsg(), "");
    PMEMoid oid = pmemobj_tx_alloc(sizeof *e, 0);
    if (OID_IS_NULL(oid)) die("pmemobj_tx_alloc: %s%s", pmemobj_errormsg(), "");
    e = (struct entry *)((char *)pop + oid.off);
    ref = oid.off;
    if (pmemobj_tx_add_range_direct(b, sizeof *b) != 0) die("pmemobj_tx_add_range: %s%s", pmemobj_errormsg(), "");
  }
  e->key = key;
  e->next = *b;
  memset(e->value, byte, VALUE);
  *b = ref;
  if (m->sys == REMEM) {
    check(remem_tx_commit(heap), "remem_tx_commit");
  } else {
    pmemobj_tx_commit();
    if (pmemobj_tx_end() != 0) die("pmemobj_tx_end: %s%s", pmemobj_errormsg(), "");
  }
}

/* One transaction: overwrite the value of `key` (present). */
static void kv_update(struct kv *m, uint64_t key, int byte) {
  struct entry *e = find(m, key);
  if (!e) die("kv_update: a key is missing%s%s", "", "");
  if (m->sys == REMEM) {
    check(remem_tx_begin(heap), "remem_tx_begin");
    check(remem_tx_add_range(heap, e->value, VALUE), "remem_tx_add_range");
    memset(e->value, byte, VALUE);
    check(remem_tx_commit(heap), "remem_tx_commit");
  } else {
    if (pmemobj_tx_begin(pop, NULL, TX_PARAM_NONE) != 0) die("pmemobj_tx_begin: %s%s", pmemobj_errormsg(), "");
    if (pmemobj_tx_add_range_direct(e->value, VALUE) != 0) die("pmemobj_tx_add_range: %s%s", pmemobj_errormsg(), "");
    memset(e->value, byte, VALUE);
    pmemobj_tx_commit();
    if (pmemobj_tx_end() != 0) die("pmemobj_tx_end: %s%s", pmemobj_errormsg(), "");
  }
}

static void kv_run(enum sys s, uint64_t nkeys, uint64_t seed) {
  uint64_t *keys = malloc(nkeys * sizeof *keys);
  if (!keys) die("out of memory%s%s", "", "");
  uint64_t st = seed | 1;
  for (uint64_t i = 0; i < nkeys; i++) keys[i] = xorshift(&st); /* distinct: xorshift is a bijection */
  struct kv m;
  kv_open(&m, s, nkeys);

  double t0 = now_ns();
  for (uint64_t i = 0; i < nkeys; i++) kv_insert(&m, keys[i], (int)i);
  printf("kv_insert_tx %.2f\n", (now_ns() - t0) / (double)nkeys);

  uint64_t r = seed ^ 0x5851F42D4C957F2Dull;
  t0 = now_ns();
  for (uint64_t i = 0; i < nkeys; i++) kv_update(&m, keys[xorshift(&r) % nkeys], (int)i + 1);
  printf("kv_update_tx %.2f\n", (now_ns() - t0) / (double)nkeys);

  uint64_t sum = 0;
  t0 = now_ns();
  for (uint64_t i = 0; i < nkeys; i++) {
    struct entry *e = find(&m, keys[xorshift(&r) % nkeys]);
    sum += e->value[0];
  }
  printf("kv_lookup %.2f\n", (now_ns() - t0) / (double)nkeys);
  escape(&sum);
  fflush(stdout);
  free(keys);
}

/* ---------------------------------------------------------------- main */

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr,
            "usage: cbench alloc_free_64 THREADS REP_MS DIR remem|malloc\n"
            "       cbench tx_update_64 THREADS REP_MS DIR remem|pmdk\n"
            "       cbench kv KEYS SEED DIR remem|pmdk\n");
    return 2;
  }
  const char *cs = argv[1], *dir = argv[4];
  long a = atol(argv[2]), c = atol(argv[3]);
  enum sys s = parse_sys(argv[5]);
  if (a < 1 || c < 1) die("bad arguments%s%s", "", "");
  int alloc = strcmp(cs, "alloc_free_64") == 0, tx = strcmp(cs, "tx_update_64") == 0, kv = strcmp(cs, "kv") == 0;
  if (!alloc && !tx && !kv) die("unknown case %s%s", cs, "");
  if ((alloc && s == PMDK) || ((tx || kv) && s == MALLOC)) die("%s does not run on %s", cs, NAMES[s]);
  open_sys(s, dir);
  if (kv) {
    kv_run(s, (uint64_t)a, (uint64_t)c);
  } else {
    if (a > 64) die("at most 64 threads%s%s", "", "");
    struct run r = {.sys = s, .threads = (int)a, .rep_ns = (double)c * 1e6};
    printf("%s %.2f\n", cs, run_threads(&r, alloc ? alloc_free_thread : tx_update_thread));
  }
  close_sys(s);
  return 0;
}
