/* examples/c/fork.c: a forked child never corrupts its parent's heap.
 *
 *   fork DIR      (DIR must exist; the heap is DIR/fork.heap)
 *
 * The parent allocates 10 000 blocks of 64 B and forks; the child tries to
 * allocate 10 000 more and fill them with 0xCC while the parent allocates
 * 10 000 and fills them with 0xAA. Every call the child makes with the
 * inherited handle must return REMEM_FORKED (naming the parent's pid), a
 * raw write into the heap must fault in the child, remem_close() in the
 * child must release nothing, and children that exec (system, popen,
 * fork + exec) must work as usual. The parent's blocks must all be intact,
 * remem_check_live() clean, before and after reopening. Exits 0 and prints
 * "fork: ok" when everything held. */
#define _GNU_SOURCE
#include <remem.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define BLOCKS 10000
#define SIZE 64

#define TRY(call) do { remem_status s_ = (call); if (s_ != REMEM_OK) { \
    fprintf(stderr, "fork: %s: %s: %s\n", #call, remem_status_name(s_), remem_last_error()); exit(1); } } while (0)
#define EXPECT(cond, ...) do { if (!(cond)) { fprintf(stderr, "fork: FAILED: " __VA_ARGS__); \
    fputc('\n', stderr); exit(1); } } while (0)

static void *before[BLOCKS], *after[BLOCKS];

static int holds(void *p, unsigned char byte) {
  const unsigned char *b = p;
  for (int i = 0; i < SIZE; i++)
    if (b[i] != byte) return 0;
  return 1;
}

static int wait_for(pid_t pid) { /* exit code, or -signal */
  int st;
  if (waitpid(pid, &st, 0) != pid) { perror("waitpid"); exit(1); }
  return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
}

/* In the child: is `s` REMEM_FORKED with a message naming the parent? */
static int forked(remem_status s, pid_t parent) {
  char want[64];
  snprintf(want, sizeof want, "opened by process %d;", (int)parent);
  return s == REMEM_FORKED && strstr(remem_last_error(), want) != NULL;
}

/* The child's side of the scenario; exit code = first failed check. */
static int child(remem_heap *h, pid_t parent) {
  int refused = 0, corrupted = 0;
  for (int i = 0; i < BLOCKS; i++) {
    void *p;
    remem_status s = remem_alloc(h, SIZE, &p);
    if (s == REMEM_OK) { memset(p, 0xCC, SIZE); corrupted++; }
    else if (forked(s, parent)) refused++;
  }
  if (refused != BLOCKS || corrupted) return 2;
  void *p;
  remem_check_report r;
  remem_heap_stats st;
  uint64_t epoch;
  uint32_t depth;
  int fd;
  if (!forked(remem_free(h, before[0]), parent)) return 3;
  if (!forked(remem_realloc(h, before[1], 200, &p), parent)) return 4;
  if (!forked(remem_root(h, &p), parent)) return 5;
  if (!forked(remem_root_or_alloc(h, 64, &p, NULL), parent)) return 6;
  if (!forked(remem_alloc_into(h, (void **)before[2], 64), parent)) return 7;
  if (!forked(remem_tx_begin(h), parent)) return 8;
  if (!forked(remem_tx_depth(h, &depth), parent)) return 9;
  if (!forked(remem_flush(h, &epoch), parent)) return 10;
  if (!forked(remem_check(h, &r), parent)) return 11;
  if (!forked(remem_check_live(h, (const void *const *)before, BLOCKS, &r), parent)) return 12;
  if (!forked(remem_stats(h, &st), parent)) return 13;
  if (!forked(remem_memfd(h, &fd), parent)) return 14;
  if (!forked(remem_close(h), parent)) return 15;   /* releases nothing */
  if (!forked(remem_alloc(h, SIZE, &p), parent)) return 16; /* still the same answer */
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2) { fprintf(stderr, "usage: fork DIR\n"); return 2; }
  char path[4096];
  snprintf(path, sizeof path, "%s/fork.heap", argv[1]);
  unlink(path);
  remem_heap *h;
  TRY(remem_create(path, 64 << 20, 0, &h));
  for (int i = 0; i < BLOCKS; i++) {
    TRY(remem_alloc(h, SIZE, &before[i]));
    memset(before[i], 0x11, SIZE);
  }

  /* 1. The scenario. */
  pid_t parent = getpid();
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) { perror("fork"); return 1; }
  if (pid == 0) _exit(child(h, parent));
  for (int i = 0; i < BLOCKS; i++) {
    TRY(remem_alloc(h, SIZE, &after[i]));
    memset(after[i], 0xAA, SIZE);
  }
  int code = wait_for(pid);
  EXPECT(code == 0, "the child's check number %d failed", code);
  int overwritten = 0;
  for (int i = 0; i < BLOCKS; i++) overwritten += !holds(before[i], 0x11) + !holds(after[i], 0xAA);
  EXPECT(overwritten == 0, "%d of the parent's blocks were overwritten", overwritten);
  void *live[2 * BLOCKS];
  memcpy(live, before, sizeof before);
  memcpy(live + BLOCKS, after, sizeof after);
  remem_check_report r;
  TRY(remem_check_live(h, (const void *const *)live, 2 * BLOCKS, &r));
  printf("fork: child's %d allocations all refused with REMEM_FORKED; parent's %d blocks intact, check_live ok\n",
         BLOCKS, 2 * BLOCKS);

  /* 2. A raw write through a pointer into the inherited heap faults. */
  fflush(NULL);
  pid = fork();
  if (pid == 0) {
    *(volatile unsigned char *)before[0] = 0xCC;
    _exit(1);
  }
  code = wait_for(pid);
  EXPECT(code == -SIGSEGV, "a raw write in the child did not fault (%d)", code);
  EXPECT(holds(before[0], 0x11), "the child's raw write reached the parent's block");
  printf("fork: a raw write in the child faults (SIGSEGV); the parent's block is intact\n");

  /* 3. Children that exec are unaffected. */
  int st = system("exit 3");
  EXPECT(WIFEXITED(st) && WEXITSTATUS(st) == 3, "system() gave %d", st);
  FILE *f = popen("echo popen works", "r");
  char line[64] = "";
  EXPECT(f && fgets(line, sizeof line, f) && strcmp(line, "popen works\n") == 0, "popen read '%s'", line);
  EXPECT(pclose(f) == 0, "pclose");
  fflush(NULL);
  pid = fork();
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", "exit 7", (char *)NULL);
    _exit(99);
  }
  EXPECT(wait_for(pid) == 7, "fork + exec");
  printf("fork: system, popen and fork + exec work as usual\n");

  /* 4. The parent goes on: transactions, flush, close, reopen. */
  void *extra;
  TRY(remem_tx_begin(h));
  TRY(remem_tx_alloc(h, SIZE, &extra));
  memset(extra, 0x33, SIZE);
  TRY(remem_tx_commit(h));
  uint64_t epoch;
  TRY(remem_flush(h, &epoch));
  TRY(remem_close(h));
  TRY(remem_open(path, &h));
  overwritten = !holds(extra, 0x33);
  for (int i = 0; i < BLOCKS; i++) overwritten += !holds(before[i], 0x11) + !holds(after[i], 0xAA);
  EXPECT(overwritten == 0, "%d blocks changed across the reopen", overwritten);
  void *all[2 * BLOCKS + 1];
  memcpy(all, live, sizeof live);
  all[2 * BLOCKS] = extra;
  TRY(remem_check_live(h, (const void *const *)all, 2 * BLOCKS + 1, &r));
  TRY(remem_close(h));
  printf("fork: ok (reopened: every block intact, check_live ok)\n");
  return 0;
}
