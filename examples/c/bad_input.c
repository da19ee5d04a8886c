/*
 * bad_input: every kind of bad input across the C boundary gives a status
 * code and a message, never a crash: NULL arguments, double frees,
 * pointers from malloc, the stack or another heap, wrong and closed
 * handles, sizes that overflow, misused transactions, bad files.
 *
 *   bad_input DIR     (DIR: a scratch directory for heap files)
 *
 * Prints one "ok"/"not ok" line per check and "N passed, M failed".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "remem.h"

static int passed, failed;

/* Checks one call's status; a failure must come with a message that names
 * the function, a success must clear the message. */
static void expect(const char *what, remem_status got, remem_status want) {
  const char *msg = remem_last_error();
  int good = got == want;
  if (got != REMEM_OK && (msg == NULL || strncmp(msg, "remem_", 6) != 0)) good = 0;
  if (got == REMEM_OK && (msg == NULL || msg[0] != '\0')) good = 0;
  if (good) {
    passed++;
    printf("ok %d - %s -> %s%s%s\n", passed + failed, what, remem_status_name(got), got ? ": " : "", got ? msg : "");
  } else {
    failed++;
    printf("not ok %d - %s -> %s (want %s), message \"%s\"\n", passed + failed, what, remem_status_name(got),
           remem_status_name(want), msg ? msg : "(NULL)");
  }
}

static void truth(const char *what, int ok) {
  if (ok)
    passed++;
  else
    failed++;
  printf("%s %d - %s\n", ok ? "ok" : "not ok", passed + failed, what);
}

#define EXPECT(call, want) expect(#call, (call), (want))
#define TRUTH(cond) truth(#cond, (cond))

static remem_heap *h; /* the heap most checks use */

static void *other_thread_commit(void *arg) {
  (void)arg;
  EXPECT(remem_tx_commit(h), REMEM_NO_TRANSACTION); /* the transaction belongs to the main thread */
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: bad_input DIR\n");
    return 2;
  }
  char path[4096], junk[4096], missing[4096];
  snprintf(path, sizeof path, "%s/bad_input.heap", argv[1]);
  snprintf(junk, sizeof junk, "%s/junk.heap", argv[1]);
  snprintf(missing, sizeof missing, "%s/no/such/dir/x.heap", argv[1]);
  unlink(path);

  remem_heap *other, *x = NULL, *y = NULL, *closed;
  void *p = NULL, *q = NULL, *big = NULL, *root = NULL;
  size_t n = 0;
  uint32_t depth = 0;
  remem_heap_stats st;
  remem_check_report rep;
  int local = 0;

  printf("# setup\n");
  EXPECT(remem_create_memfd(16 << 20, 0, &h), REMEM_OK);
  EXPECT(remem_create_memfd(16 << 20, 0, &other), REMEM_OK);
  EXPECT(remem_stats(h, &st), REMEM_OK);
  char *base = st.base;

  printf("# NULL arguments\n");
  EXPECT(remem_create(NULL, 16 << 20, 0, &x), REMEM_NULL_PARAMETER);
  EXPECT(remem_recover(NULL, NULL, 0, &x, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_recover("/nonexistent/remem.baseline", NULL, 0, &x, NULL), REMEM_BAD_ARGUMENT); /* no agent, no data loss allowed */
  EXPECT(remem_recover("/nonexistent/remem.baseline", "not an address", 0, &x, NULL), REMEM_BAD_ARGUMENT);
  EXPECT(remem_recover("/nonexistent/remem.baseline", NULL, 1, &x, NULL), REMEM_IO); /* no such baseline */
  EXPECT(remem_flush(NULL, NULL), REMEM_NULL_PARAMETER);
  TRUTH(x == NULL);
  EXPECT(remem_create(path, 16 << 20, 0, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_open(NULL, &x), REMEM_NULL_PARAMETER);
  EXPECT(remem_open(path, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_create_memfd(16 << 20, 0, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_attach(0, NULL), REMEM_NULL_PARAMETER);
  p = (void *)1;
  EXPECT(remem_alloc(NULL, 16, &p), REMEM_NULL_PARAMETER);
  TRUTH(p == NULL);
  EXPECT(remem_alloc(h, 16, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_alloc_zeroed(h, 16, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_alloc_aligned(h, 16, 64, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_realloc(h, NULL, 16, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_free(h, NULL), REMEM_OK);
  EXPECT(remem_free(NULL, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_usable_size(h, NULL, &n), REMEM_NULL_PARAMETER);
  EXPECT(remem_alloc(h, 64, &p), REMEM_OK);
  EXPECT(remem_usable_size(h, p, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_alloc_into(h, NULL, 16), REMEM_NULL_PARAMETER);
  EXPECT(remem_root(h, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_root_or_alloc(h, 16, NULL, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_set_root(h, NULL), REMEM_OK);
  EXPECT(remem_stats(h, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_recovery(h, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_check(h, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_check_live(h, NULL, 3, &rep), REMEM_NULL_PARAMETER);
  EXPECT(remem_memfd(h, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_tx_depth(h, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_tx_alloc(h, 16, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_heap_at(NULL, &x), REMEM_NOT_IN_HEAP);
  EXPECT(remem_heap_at(base, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_alloc_at(base, 16, 16, NULL), REMEM_NULL_PARAMETER);
  EXPECT(remem_alloc_at(NULL, 16, 16, &q), REMEM_NOT_IN_HEAP);
  TRUTH(q == NULL);
  EXPECT(remem_alloc_at(base, 16, 3, &q), REMEM_BAD_ARGUMENT);
  EXPECT(remem_free_at(NULL, NULL), REMEM_OK);
  EXPECT(remem_close(NULL), REMEM_OK);
  TRUTH(strcmp(remem_status_name(12345), "REMEM_UNKNOWN_STATUS") == 0);
  TRUTH(remem_version() != NULL && remem_version()[0] != '\0');

  printf("# double free\n");
  EXPECT(remem_free(h, p), REMEM_OK);
  EXPECT(remem_free(h, p), REMEM_DOUBLE_FREE);
  EXPECT(remem_usable_size(h, p, &n), REMEM_DOUBLE_FREE);
  EXPECT(remem_realloc(h, p, 128, &q), REMEM_DOUBLE_FREE);
  TRUTH(q == NULL);
  EXPECT(remem_set_root(h, p), REMEM_DOUBLE_FREE);
  EXPECT(remem_alloc(h, 100000, &big), REMEM_OK);
  EXPECT(remem_free(h, big), REMEM_OK);
  EXPECT(remem_free(h, big), REMEM_DOUBLE_FREE);
  EXPECT(remem_alloc(h, 64, &p), REMEM_OK);
  EXPECT(remem_tx_begin(h), REMEM_OK);
  EXPECT(remem_tx_free(h, p), REMEM_OK);
  EXPECT(remem_tx_free(h, p), REMEM_DOUBLE_FREE);
  EXPECT(remem_tx_commit(h), REMEM_OK);
  EXPECT(remem_free(h, p), REMEM_DOUBLE_FREE);

  printf("# pointers from malloc, the stack, another heap, the middle of a block\n");
  char *m = malloc(64);
  EXPECT(remem_free(h, m), REMEM_NOT_IN_HEAP);
  EXPECT(remem_usable_size(h, m, &n), REMEM_NOT_IN_HEAP);
  EXPECT(remem_realloc(h, m, 128, &q), REMEM_NOT_IN_HEAP);
  EXPECT(remem_set_root(h, m), REMEM_NOT_IN_HEAP);
  EXPECT(remem_alloc_into(h, (void **)m, 16), REMEM_INVALID_POINTER);
  EXPECT(remem_free(h, &local), REMEM_NOT_IN_HEAP);
  EXPECT(remem_alloc_into(h, (void **)&q, 16), REMEM_INVALID_POINTER);
  EXPECT(remem_heap_at(m, &x), REMEM_NOT_IN_HEAP);
  EXPECT(remem_alloc_at(m, 16, 16, &q), REMEM_NOT_IN_HEAP);
  EXPECT(remem_free_at(m, m), REMEM_NOT_IN_HEAP);
  EXPECT(remem_free_at(base, m), REMEM_NOT_IN_HEAP);
  EXPECT(remem_alloc(other, 64, &q), REMEM_OK);
  EXPECT(remem_free(h, q), REMEM_NOT_IN_HEAP);
  EXPECT(remem_usable_size(h, q, &n), REMEM_NOT_IN_HEAP);
  EXPECT(remem_free(other, q), REMEM_OK);
  EXPECT(remem_alloc(h, 64, &p), REMEM_OK);
  EXPECT(remem_free(h, (char *)p + 16), REMEM_INVALID_POINTER);
  EXPECT(remem_free(h, base + 8), REMEM_INVALID_POINTER);
  EXPECT(remem_alloc_into(h, (void **)(base + 8), 16), REMEM_INVALID_POINTER);
  EXPECT(remem_alloc_into(h, (void **)((char *)p + 4), 16), REMEM_INVALID_POINTER);
  EXPECT(remem_tx_begin(h), REMEM_OK);
  EXPECT(remem_tx_add_range(h, m, 8), REMEM_INVALID_POINTER);
  EXPECT(remem_tx_add_range(h, p, 4096), REMEM_INVALID_POINTER);
  EXPECT(remem_tx_free(h, m), REMEM_NOT_IN_HEAP);
  EXPECT(remem_tx_free(h, (char *)p + 16), REMEM_INVALID_POINTER);
  EXPECT(remem_tx_commit(h), REMEM_OK);
  EXPECT(remem_usable_size(h, p, &n), REMEM_OK);
  TRUTH(n >= 64);

  printf("# wrong and closed handles\n");
  EXPECT(remem_create_memfd(16 << 20, 0, &closed), REMEM_OK);
  EXPECT(remem_close(closed), REMEM_OK);
  EXPECT(remem_alloc(closed, 16, &q), REMEM_BAD_HANDLE);
  EXPECT(remem_free(closed, p), REMEM_BAD_HANDLE);
  EXPECT(remem_tx_begin(closed), REMEM_BAD_HANDLE);
  EXPECT(remem_stats(closed, &st), REMEM_BAD_HANDLE);
  EXPECT(remem_check(closed, &rep), REMEM_BAD_HANDLE);
  EXPECT(remem_close(closed), REMEM_BAD_HANDLE);
  EXPECT(remem_alloc((remem_heap *)(uintptr_t)0x1234, 16, &q), REMEM_BAD_HANDLE);
  EXPECT(remem_alloc((remem_heap *)m, 16, &q), REMEM_BAD_HANDLE);
  EXPECT(remem_alloc((remem_heap *)p, 16, &q), REMEM_BAD_HANDLE);
  EXPECT(remem_alloc((remem_heap *)UINTPTR_MAX, 16, &q), REMEM_BAD_HANDLE);
  EXPECT(remem_close((remem_heap *)&local), REMEM_BAD_HANDLE);
  free(m);

  printf("# sizes that overflow or make no sense\n");
  EXPECT(remem_alloc(h, SIZE_MAX, &q), REMEM_OUT_OF_MEMORY);
  TRUTH(q == NULL);
  EXPECT(remem_alloc(h, (size_t)st.size + 1, &q), REMEM_OUT_OF_MEMORY);
  EXPECT(remem_alloc(h, 0, &q), REMEM_BAD_ARGUMENT);
  EXPECT(remem_alloc_zeroed(h, SIZE_MAX, &q), REMEM_OUT_OF_MEMORY);
  EXPECT(remem_alloc_aligned(h, 64, 3, &q), REMEM_BAD_ARGUMENT);
  EXPECT(remem_alloc_aligned(h, 64, 0, &q), REMEM_BAD_ARGUMENT);
  EXPECT(remem_alloc_aligned(h, 64, 8192, &q), REMEM_BAD_ARGUMENT);
  EXPECT(remem_realloc(h, p, SIZE_MAX, &q), REMEM_OUT_OF_MEMORY);
  EXPECT(remem_realloc(h, p, 0, &q), REMEM_BAD_ARGUMENT);
  EXPECT(remem_usable_size(h, p, &n), REMEM_OK); /* still allocated after the failed reallocs */
  EXPECT(remem_alloc_zeroed(h, 64, &root), REMEM_OK);
  EXPECT(remem_alloc_into(h, (void **)root, SIZE_MAX), REMEM_OUT_OF_MEMORY);
  TRUTH(*(void **)root == NULL);
  EXPECT(remem_free(h, root), REMEM_OK);
  EXPECT(remem_root_or_alloc(h, SIZE_MAX, &q, NULL), REMEM_OUT_OF_MEMORY);
  EXPECT(remem_tx_begin(h), REMEM_OK);
  EXPECT(remem_tx_alloc(h, SIZE_MAX, &q), REMEM_OUT_OF_MEMORY);
  EXPECT(remem_tx_alloc_zeroed(h, SIZE_MAX, &q), REMEM_OUT_OF_MEMORY);
  EXPECT(remem_tx_alloc(h, 0, &q), REMEM_BAD_ARGUMENT);
  EXPECT(remem_tx_add_range(h, p, SIZE_MAX), REMEM_BAD_ARGUMENT);
  EXPECT(remem_tx_add_range(h, p, 8), REMEM_OK);
  EXPECT(remem_tx_commit(h), REMEM_OK);
  EXPECT(remem_create(path, 0, 0, &x), REMEM_BAD_ARGUMENT);
  EXPECT(remem_create(path, UINT64_MAX, 0, &x), REMEM_BAD_ARGUMENT);
  EXPECT(remem_create_memfd(UINT64_MAX - 100, 0, &x), REMEM_BAD_ARGUMENT);
  EXPECT(remem_create_memfd(16 << 20, 0x1001, &x), REMEM_BAD_ARGUMENT);
  EXPECT(remem_create_memfd(16 << 20, (uint64_t)(uintptr_t)base, &x), REMEM_ADDRESS_IN_USE);
  TRUTH(x == NULL);

  printf("# transactions misused\n");
  EXPECT(remem_tx_commit(h), REMEM_NO_TRANSACTION);
  EXPECT(remem_tx_abort(h), REMEM_NO_TRANSACTION);
  EXPECT(remem_tx_add_range(h, p, 8), REMEM_NO_TRANSACTION);
  EXPECT(remem_tx_alloc(h, 16, &q), REMEM_NO_TRANSACTION);
  EXPECT(remem_tx_free(h, p), REMEM_NO_TRANSACTION);
  EXPECT(remem_tx_begin(h), REMEM_OK);
  EXPECT(remem_tx_begin(h), REMEM_OK);
  EXPECT(remem_tx_depth(h, &depth), REMEM_OK);
  TRUTH(depth == 2);
  EXPECT(remem_tx_abort(h), REMEM_OK);
  EXPECT(remem_tx_add_range(h, p, 8), REMEM_TX_ABORTED);
  EXPECT(remem_tx_alloc(h, 16, &q), REMEM_TX_ABORTED);
  pthread_t t;
  pthread_create(&t, NULL, other_thread_commit, NULL);
  pthread_join(t, NULL);
  EXPECT(remem_tx_commit(h), REMEM_TX_ABORTED);
  EXPECT(remem_tx_depth(h, &depth), REMEM_OK);
  TRUTH(depth == 0);

  printf("# files and descriptors\n");
  EXPECT(remem_create(path, 4 << 20, 0, &x), REMEM_OK);
  EXPECT(remem_create(path, 4 << 20, 0, &y), REMEM_EXISTS);
  EXPECT(remem_close(x), REMEM_OK);
  EXPECT(remem_open(path, &x), REMEM_OK);

  EXPECT(remem_open(path, &y), REMEM_LOCKED);
  EXPECT(remem_close(x), REMEM_OK);
  EXPECT(remem_open(missing, &x), REMEM_IO);
  EXPECT(remem_create(missing, 4 << 20, 0, &x), REMEM_IO);
  EXPECT(remem_open("", &x), REMEM_BAD_ARGUMENT);
  int fd = open(junk, O_CREAT | O_TRUNC | O_WRONLY, 0600);
  char garbage[8192];
  memset(garbage, 0x5a, sizeof garbage);
  TRUTH(write(fd, garbage, sizeof garbage) == (ssize_t)sizeof garbage);
  close(fd);
  EXPECT(remem_open(junk, &x), REMEM_CORRUPT);
  fd = open(junk, O_RDONLY);
  EXPECT(remem_attach(fd, &x), REMEM_CORRUPT);
  close(fd);
  EXPECT(remem_attach(-1, &x), REMEM_BAD_ARGUMENT);
  EXPECT(remem_attach(fd, &x), REMEM_BAD_ARGUMENT); /* closed just above */
  TRUTH(x == NULL);

  printf("# the heaps are still sound\n");
  EXPECT(remem_free(h, p), REMEM_OK);
  EXPECT(remem_check(h, &rep), REMEM_OK);
  TRUTH(rep.ok && rep.problems == 0);
  EXPECT(remem_check_live(h, NULL, 0, &rep), REMEM_OK);
  EXPECT(remem_close(h), REMEM_OK);
  EXPECT(remem_check(other, &rep), REMEM_OK);
  EXPECT(remem_close(other), REMEM_OK);
  unlink(path);
  unlink(junk);

  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
