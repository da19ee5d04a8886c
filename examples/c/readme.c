/* README example: a counter in a heap file, bumped in a transaction. */
#include <remem.h>
#include <stdint.h>
#include <stdio.h>

#define TRY(call) do { remem_status s_ = (call); if (s_ != REMEM_OK) { \
    fprintf(stderr, "%s: %s\n", remem_status_name(s_), remem_last_error()); return 1; } } while (0)

struct root { uint64_t runs; char *note; }; /* pointers into the heap survive reopening */

int main(int argc, char **argv) {
  const char *path = argc > 1 ? argv[1] : "/tmp/counter.heap";
  remem_heap *h;
  if (remem_open(path, &h) != REMEM_OK)                       /* first run: no file yet */
    TRY(remem_create(path, 16 << 20, 0, &h));
  struct root *r;
  TRY(remem_root_or_alloc(h, sizeof *r, (void **)&r, NULL)); /* zeroed when created */
  TRY(remem_tx_begin(h));                                     /* all or nothing */
  TRY(remem_tx_add_range(h, r, sizeof *r));                   /* undo log, then write */
  if (!r->note) TRY(remem_tx_alloc(h, 32, (void **)&r->note));
  r->runs++;
  snprintf(r->note, 32, "run number %llu", (unsigned long long)r->runs);
  TRY(remem_tx_commit(h));
  printf("%s\n", r->note);
  TRY(remem_close(h));                                        /* flushes to the baseline */
  return 0;
}
