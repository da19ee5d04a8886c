/*
 * kv: a small key-value store in a remem heap, updated with transactions.
 *
 * The root object is a fixed-size open-addressing hash table of
 * (key, value*) slots; values are blocks allocated with remem_tx_alloc.
 * A put is one transaction: log the slot (and the count), allocate the new
 * value, free the old one at commit, store.
 *
 *   kv fill PATH N      create a heap file at PATH, put keys 0..N-1, close
 *   kv verify PATH N    reopen it (a new process), check every key and
 *                       that no block leaked, update and close
 *   kv crash N ROUNDS   the SIGKILL test: a memfd heap held by this process;
 *                       ROUNDS times, a writer child attaches and puts keys,
 *                       acknowledging each commit through a pipe, and is
 *                       killed with SIGKILL after a random number of acks;
 *                       a verifier child then attaches (recovery runs) and
 *                       checks every acknowledged key and remem_check().
 *                       A last writer finishes all N puts and a last
 *                       verifier checks them all.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "remem.h"

#define MAGIC 0x6b76737430303031ull /* "kvst0001" */
#define NSLOTS 8192                 /* hash table size: at most NSLOTS - 1 keys */

struct value {
  uint64_t version;
  uint64_t len;
  char text[]; /* len bytes + NUL */
};

struct slot {
  uint64_t key; /* key + 1; 0: empty */
  struct value *val;
};

struct root {
  uint64_t magic;
  uint64_t count;
  struct slot slots[NSLOTS];
};

/* In the crash test, write i puts key i % keys at version i. */
static uint64_t key_of(uint64_t i, uint64_t keys) { return (i * 7919) % keys; }

static void die(const char *what, remem_status s) {
  fprintf(stderr, "kv[%d]: %s: %s: %s\n", (int)getpid(), what, remem_status_name(s), remem_last_error());
  exit(1);
}

#define TRY(call)                    \
  do {                               \
    remem_status s_ = (call);        \
    if (s_ != REMEM_OK) die(#call, s_); \
  } while (0)

static struct slot *find(struct root *r, uint64_t key) {
  uint64_t h = (key * 0x9e3779b97f4a7c15ull) >> 51; /* 13 bits: NSLOTS */
  for (uint64_t n = 0; n < NSLOTS; n++) {
    struct slot *s = &r->slots[(h + n) % NSLOTS];
    if (s->key == 0 || s->key == key + 1) return s;
  }
  return NULL;
}

static int value_text(char *buf, size_t cap, uint64_t key, uint64_t version) {
  return snprintf(buf, cap, "value of key %" PRIu64 ", version %" PRIu64, key, version);
}

/* Puts key -> (version, text) in one transaction. */
static remem_status put(remem_heap *h, struct root *r, uint64_t key, uint64_t version) {
  struct slot *s = find(r, key);
  if (!s) {
    fprintf(stderr, "kv: the table is full\n");
    exit(1);
  }
  char text[96];
  int len = value_text(text, sizeof text, key, version);
  remem_status st;
  if ((st = remem_tx_begin(h)) != REMEM_OK) return st;
  struct value *v;
  if ((st = remem_tx_add_range(h, s, sizeof *s)) != REMEM_OK) goto abort;
  if ((st = remem_tx_alloc(h, sizeof *v + (size_t)len + 1, (void **)&v)) != REMEM_OK) goto abort;
  v->version = version;
  v->len = (uint64_t)len;
  memcpy(v->text, text, (size_t)len + 1);
  if (s->val) {
    if ((st = remem_tx_free(h, s->val)) != REMEM_OK) goto abort;
  } else {
    if ((st = remem_tx_add_range(h, &r->count, sizeof r->count)) != REMEM_OK) goto abort;
    r->count++;
  }
  s->key = key + 1;
  s->val = v;
  return remem_tx_commit(h);
abort:
  remem_tx_abort(h); /* rolls back (after LOG_FULL remem already did: this ends the level) */
  return st;
}

/* The root, made (zeroed, atomically) if the heap has none, and stamped
 * in a transaction so that a half-initialised root is never seen. */
static struct root *root_of(remem_heap *h) {
  struct root *r;
  TRY(remem_root_or_alloc(h, sizeof *r, (void **)&r, NULL));
  if (r->magic != MAGIC) {
    if (r->magic != 0 || r->count != 0) {
      fprintf(stderr, "kv: the heap's root is not a kv table\n");
      exit(1);
    }
    TRY(remem_tx_begin(h));
    TRY(remem_tx_add_range(h, &r->magic, sizeof r->magic));
    r->magic = MAGIC;
    TRY(remem_tx_commit(h));
  }
  return r;
}

/* Checks that `key` holds a well-formed value; returns its version, or
 * UINT64_MAX when the key is absent. */
static uint64_t get_version(struct root *r, uint64_t key) {
  struct slot *s = find(r, key);
  if (!s || s->key == 0) return UINT64_MAX;
  char want[96];
  int len = value_text(want, sizeof want, key, s->val->version);
  if (s->val->len != (uint64_t)len || strcmp(s->val->text, want) != 0) {
    fprintf(stderr, "kv: key %" PRIu64 " holds a damaged value\n", key);
    exit(1);
  }
  return s->val->version;
}

static void check_heap(remem_heap *h, struct root *r) {
  /* Every block is the root or a value: a leak check, not just invariants. */
  size_t n = 0;
  const void **live = malloc(sizeof(void *) * (NSLOTS + 1));
  live[n++] = r;
  for (size_t i = 0; i < NSLOTS; i++)
    if (r->slots[i].key) live[n++] = r->slots[i].val;
  remem_check_report rep;
  remem_status s = remem_check_live(h, live, n, &rep);
  free(live);
  if (s != REMEM_OK) die("remem_check_live", s);
  printf("kv: remem_check_live: ok, %" PRIu64 " blocks, %" PRIu64 " bytes allocated, 0 leaked\n",
         rep.allocated_blocks + rep.large_runs, rep.allocated_bytes);
}

static int cmd_fill(const char *path, uint64_t n) {
  if (n > NSLOTS / 2) {
    fprintf(stderr, "kv fill: at most %d keys (the table has %d slots)\n", NSLOTS / 2, NSLOTS);
    return 2;
  }
  remem_heap *h;
  unlink(path);
  TRY(remem_create(path, 64 << 20, 0, &h));
  struct root *r = root_of(h);
  for (uint64_t k = 0; k < n; k++) TRY(put(h, r, k, 1));
  for (uint64_t k = 0; k < n; k += 3) TRY(put(h, r, k, 2)); /* updates free the old values */
  printf("kv fill: %" PRIu64 " keys put, %" PRIu64 " updated, in %s\n", n, (n + 2) / 3, path);
  TRY(remem_close(h));
  return 0;
}

static int cmd_verify(const char *path, uint64_t n) {
  remem_heap *h;
  TRY(remem_open(path, &h));
  struct root *r;
  TRY(remem_root(h, (void **)&r));
  if (!r || r->magic != MAGIC) {
    fprintf(stderr, "kv verify: %s has no kv table\n", path);
    return 1;
  }
  for (uint64_t k = 0; k < n; k++) {
    uint64_t want = k % 3 == 0 ? 2 : 1;
    uint64_t got = get_version(r, k);
    if (got != want) {
      fprintf(stderr, "kv verify: key %" PRIu64 ": version %" PRIu64 ", want %" PRIu64 "\n", k, got, want);
      return 1;
    }
  }
  if (r->count != n) {
    fprintf(stderr, "kv verify: count %" PRIu64 ", want %" PRIu64 "\n", r->count, n);
    return 1;
  }
  /* An aborted transaction changes nothing. */
  TRY(remem_tx_begin(h));
  struct slot *s = find(r, 0);
  TRY(remem_tx_add_range(h, s, sizeof *s));
  s->val = NULL;
  TRY(remem_tx_abort(h));
  if (get_version(r, 0) != 2) {
    fprintf(stderr, "kv verify: abort did not restore key 0\n");
    return 1;
  }
  check_heap(h, r);
  printf("kv verify: all %" PRIu64 " keys of %s reopened intact\n", n, path);
  TRY(remem_close(h));
  return 0;
}

/* --- the SIGKILL test --------------------------------------------------- */

struct ack {
  uint64_t i; /* put number i has committed */
};

static void writer(int memfd, int ackfd, uint64_t from, uint64_t n, uint64_t keys) {
  remem_heap *h;
  TRY(remem_attach(memfd, &h));
  struct root *r = root_of(h);
  for (uint64_t i = from; i < n; i++) {
    TRY(put(h, r, key_of(i, keys), i));
    struct ack a = {i};
    if (write(ackfd, &a, sizeof a) != (ssize_t)sizeof a) exit(1);
  }
  TRY(remem_close(h));
  exit(0);
}

/* acked[k]: highest acknowledged version of key k (UINT64_MAX: none). */
static void verifier(int memfd, const uint64_t *acked, uint64_t keys, uint64_t next) {
  remem_heap *h;
  TRY(remem_attach(memfd, &h));
  remem_recovery_report rec;
  TRY(remem_recovery(h, &rec));
  struct root *r;
  TRY(remem_root(h, (void **)&r));
  uint64_t present = 0, ahead = 0;
  for (uint64_t k = 0; r && k < keys; k++) {
    uint64_t got = get_version(r, k);
    if (got != UINT64_MAX) present++;
    if (acked[k] == UINT64_MAX && got == UINT64_MAX) continue;
    if (got == acked[k]) continue;
    /* Newer than acknowledged: only the put in flight (number `next`),
     * which may have committed before the kill without being acked. */
    if (got == next && key_of(next, keys) == k) {
      ahead++;
      continue;
    }
    fprintf(stderr, "kv crash: key %" PRIu64 " holds version %" PRIu64 ", acknowledged %" PRIu64 "\n", k, got,
            acked[k]);
    exit(1);
  }
  if ((r ? r->count : 0) != present) {
    fprintf(stderr, "kv crash: count %" PRIu64 " but %" PRIu64 " keys present\n", r ? r->count : 0, present);
    exit(1);
  }
  remem_check_report rep;
  remem_status s = remem_check(h, &rep);
  if (s != REMEM_OK) die("remem_check after recovery", s);
  printf("kv crash: verifier: %" PRIu64 " keys as acknowledged%s; recovery rolled back %" PRIu64
         " transaction(s), finished %" PRIu64 "; remem_check ok (%" PRIu64 " blocks)\n",
         present, ahead ? " (+1 committed, unacknowledged)" : "", rec.txs_rolled_back, rec.txs_finished,
         rep.allocated_blocks + rep.large_runs);
  TRY(remem_close(h));
  exit(0);
}

static int wait_child(pid_t pid, const char *what) {
  int status;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return -1;
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  if (WEXITSTATUS(status) != 0) fprintf(stderr, "kv crash: %s exited with %d\n", what, WEXITSTATUS(status));
  return WEXITSTATUS(status);
}

static int cmd_crash(uint64_t n, int rounds) {
  uint64_t keys = n / 2 > 0 ? n / 2 : 1;
  if (keys > NSLOTS / 2) keys = NSLOTS / 2; /* keep the table at most half full */
  remem_heap *h;
  TRY(remem_create_memfd(64 << 20, 0, &h));
  int memfd;
  TRY(remem_memfd(h, &memfd)); /* ours: keeps the heap's memory alive */
  TRY(remem_close(h));         /* unmapped here; the children attach */
  uint64_t *acked = malloc(sizeof *acked * keys);
  for (uint64_t k = 0; k < keys; k++) acked[k] = UINT64_MAX;
  uint64_t next = 0; /* first put not acknowledged */
  srand((unsigned)time(NULL) ^ (unsigned)getpid());
  for (int round = 0; round <= rounds; round++) {
    bool last = round == rounds;
    int p[2];
    if (pipe(p) != 0) return 1;
    fflush(stdout);
    pid_t w = fork();
    if (w == 0) {
      close(p[0]);
      writer(memfd, p[1], next, n, keys);
    }
    close(p[1]);
    uint64_t kill_after = last ? UINT64_MAX : 1 + (uint64_t)rand() % (n / (uint64_t)(rounds + 1) + 1);
    uint64_t got = 0, from = next;
    struct ack a[256];
    size_t have = 0; /* bytes in a[] */
    ssize_t r;
    /* Read in bulk to keep up with the writer, so the kill lands wherever it is. */
    while ((r = read(p[0], (char *)a + have, sizeof a - have)) > 0) {
      have += (size_t)r;
      for (size_t j = 0; j < have / sizeof a[0]; j++) {
        if (a[j].i != next) {
          fprintf(stderr, "kv crash: ack %" PRIu64 ", expected %" PRIu64 "\n", a[j].i, next);
          return 1;
        }
        acked[key_of(a[j].i, keys)] = a[j].i;
        next++;
        if (++got == kill_after) kill(w, SIGKILL); /* the acks already in the pipe still count */
      }
      size_t whole = have / sizeof a[0] * sizeof a[0];
      memmove(a, (char *)a + whole, have - whole);
      have -= whole;
    }
    close(p[0]);
    int ws = wait_child(w, "writer");
    if (last ? ws != 0 : (ws != 128 + SIGKILL && ws != 0)) return 1;
    printf("kv crash: round %d: writer %s after %" PRIu64 " acknowledged puts (%" PRIu64 "..%" PRIu64 ")\n",
           round, ws == 0 ? "finished" : "SIGKILLed", next - from, from, next);
    fflush(stdout);
    pid_t v = fork();
    if (v == 0) verifier(memfd, acked, keys, next);
    if (wait_child(v, "verifier") != 0) return 1;
    if (next == n && !last) {
      printf("kv crash: every put was acknowledged before a kill; rerun with a larger N\n");
      break;
    }
  }
  if (next != n) {
    fprintf(stderr, "kv crash: only %" PRIu64 " of %" PRIu64 " puts acknowledged\n", next, n);
    return 1;
  }
  printf("kv crash: ok: %d SIGKILL rounds; every acknowledged put survived\n", rounds);
  close(memfd);
  free(acked);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 4 && strcmp(argv[1], "fill") == 0) return cmd_fill(argv[2], strtoull(argv[3], NULL, 10));
  if (argc == 4 && strcmp(argv[1], "verify") == 0) return cmd_verify(argv[2], strtoull(argv[3], NULL, 10));
  if (argc == 4 && strcmp(argv[1], "crash") == 0) return cmd_crash(strtoull(argv[2], NULL, 10), atoi(argv[3]));
  fprintf(stderr, "usage: kv fill PATH N | kv verify PATH N | kv crash N ROUNDS   (remem %s)\n", remem_version());
  return 2;
}
