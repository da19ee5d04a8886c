/*
 * failover: a C database that fails over to another host.
 *
 * The database keeps, in its root object, a counter and a table of
 * NVALS 64-bit values spread over 32 MiB (8192 pages); transaction c sets
 * counter = c and vals[slot_of(c)] = value_of(c), so a scattered set of
 * pages is dirty at any moment and every state of the table follows from
 * the counter alone.
 *
 *   failover db PATH        with REMEM_AGENT_SOCKET set: open (or create)
 *                           the heap at PATH (remem_open registers it with
 *                           the agent, or takes it back from the agent if
 *                           the last process died), print "ready", then run
 *                           transactions for ever, printing "ack C" after
 *                           each commit of counter C (the harness kills it
 *                           with SIGKILL);
 *   failover recover PATH AGENT MODE ACKED
 *                           MODE is lazy or eager: remem_recover_with() of
 *                           PATH from the agent at AGENT ("host:port";
 *                           REMEM_TOKEN_FILE names the token), then check
 *                           that counter is ACKED or ACKED + 1 (the one in
 *                           flight may have committed), that the table is
 *                           exactly what counter implies and remem_check()
 *                           is clean; lazy waits for remem_lazy_wait();
 *                           prints "recovered C";
 *   failover verify PATH ACKED
 *                           the same checks on a heap opened with remem_open
 *                           (with REMEM_AGENT_SOCKET set: a re-attach after
 *                           the database died on this host).
 *
 * scripts/c-failover runs these on two network namespaces.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "remem.h"

#define MAGIC 0x666f766572303031ull /* "fover001" */
#define NVALS (4u << 20)            /* 32 MiB of values */
#define HEAP_SIZE (256ull << 20)

struct root {
  uint64_t magic;
  uint64_t counter;
  uint64_t *vals; /* NVALS values, one allocation */
};

static void die(const char *what, remem_status s) {
  fprintf(stderr, "failover: %s: %s: %s\n", what, remem_status_name(s), remem_last_error());
  exit(1);
}

static void check(const char *what, remem_status s) {
  if (s != REMEM_OK) die(what, s);
}

/* Pages far apart: a multiplicative hash of the counter. */
static uint64_t slot_of(uint64_t c) { return (c * 0x9e3779b97f4a7c15ull >> 20) % NVALS; }
static uint64_t value_of(uint64_t c) { return c * 0x2545f4914f6cdd1dull | 1; }

static struct root *root_of(remem_heap *h) {
  void *r = NULL;
  check("remem_root", remem_root(h, &r));
  struct root *root = r;
  if (!root || root->magic != MAGIC) {
    fprintf(stderr, "failover: the heap has no failover root\n");
    exit(1);
  }
  return root;
}

static int db(const char *path) {
  remem_heap *h = NULL;
  remem_status s = remem_open(path, &h);
  if (s == REMEM_IO && access(path, F_OK) != 0) s = remem_create(path, HEAP_SIZE, 0, &h);
  check("opening the heap", s);
  void *r = NULL;
  bool created = false;
  check("remem_root_or_alloc", remem_root_or_alloc(h, sizeof(struct root), &r, &created));
  struct root *root = r;
  if (root->magic != MAGIC) {
    check("remem_tx_begin", remem_tx_begin(h));
    check("remem_tx_add_range", remem_tx_add_range(h, root, sizeof *root));
    void *vals = NULL;
    check("remem_tx_alloc_zeroed", remem_tx_alloc_zeroed(h, NVALS * sizeof(uint64_t), &vals));
    root->vals = vals;
    root->counter = 0;
    root->magic = MAGIC;
    check("remem_tx_commit", remem_tx_commit(h));
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  printf("ready %" PRIu64 "\n", root->counter);
  while (root->counter < UINT64_MAX) {
    uint64_t c = root->counter + 1;
    uint64_t *v = &root->vals[slot_of(c)];
    check("remem_tx_begin", remem_tx_begin(h));
    check("remem_tx_add_range", remem_tx_add_range(h, &root->counter, sizeof root->counter));
    check("remem_tx_add_range", remem_tx_add_range(h, v, sizeof *v));
    *v = value_of(c);
    root->counter = c;
    check("remem_tx_commit", remem_tx_commit(h));
    printf("ack %" PRIu64 "\n", c);
  }
  return 0;
}

/* Every check a recovered heap must pass; returns its counter. */
static uint64_t verify(remem_heap *h, uint64_t acked) {
  struct root *root = root_of(h);
  uint64_t c = root->counter;
  if (c < acked || c > acked + 1) {
    fprintf(stderr, "failover: counter %" PRIu64 " but %" PRIu64 " transactions were acknowledged\n", c, acked);
    exit(1);
  }
  uint64_t *want = calloc(NVALS, sizeof(uint64_t));
  if (!want) exit(1);
  for (uint64_t i = 1; i <= c; i++) want[slot_of(i)] = value_of(i);
  for (uint64_t i = 0; i < NVALS; i++) {
    if (root->vals[i] != want[i]) {
      fprintf(stderr, "failover: vals[%" PRIu64 "] is %" PRIx64 ", expected %" PRIx64 " (counter %" PRIu64 ")\n", i,
              root->vals[i], want[i], c);
      exit(1);
    }
  }
  free(want);
  remem_check_report rep;
  check("remem_check", remem_check(h, &rep));
  if (!rep.ok) {
    fprintf(stderr, "failover: remem_check found %" PRIu64 " problems\n", rep.problems);
    exit(1);
  }
  return c;
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int recover(const char *path, const char *agent, const char *mode, uint64_t acked) {
  remem_recover_options o;
  memset(&o, 0, sizeof o);
  o.size = sizeof o;
  o.baseline = path;
  o.agent = agent;
  o.lazy = strcmp(mode, "lazy") == 0;
  remem_recover_report rep;
  remem_heap *h = NULL;
  double t0 = now_s();
  check("remem_recover_with", remem_recover_with(&o, &h, &rep));
  uint64_t first = root_of(h)->counter;
  double first_use = now_s() - t0;
  if (o.lazy) {
    remem_lazy_status st;
    check("remem_lazy_wait", remem_lazy_wait(h, &st));
    if (!st.settled || st.committed_epoch == 0) {
      fprintf(stderr, "failover: remem_lazy_wait returned before the heap was in and committed\n");
      return 1;
    }
  }
  uint64_t c = verify(h, acked);
  if (c != first) {
    fprintf(stderr, "failover: the first read said %" PRIu64 ", the full check %" PRIu64 "\n", first, c);
    return 1;
  }
  check("remem_close", remem_close(h));
  printf("recovered %" PRIu64 " (%s; first use %.3f s; %" PRIu64 " pages from the agent, %" PRIu64
         " from the baseline)\n",
         c, mode, first_use, rep.pages_pulled, rep.pages_from_baseline);
  return 0;
}

static int verify_open(const char *path, uint64_t acked) {
  remem_heap *h = NULL;
  check("remem_open", remem_open(path, &h));
  uint64_t c = verify(h, acked);
  check("remem_close", remem_close(h));
  printf("verified %" PRIu64 "\n", c);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "db") == 0) return db(argv[2]);
  if (argc == 6 && strcmp(argv[1], "recover") == 0) return recover(argv[2], argv[3], argv[4], strtoull(argv[5], NULL, 10));
  if (argc == 4 && strcmp(argv[1], "verify") == 0) return verify_open(argv[2], strtoull(argv[3], NULL, 10));
  fprintf(stderr,
          "usage: failover db PATH | failover recover PATH AGENT lazy|eager ACKED | failover verify PATH ACKED\n");
  return 2;
}
