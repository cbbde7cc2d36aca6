/* libFuzzer target: open an untrusted image and read it.
 *
 * The input is the whole image file.  It is opened with format probing
 * (so qcow2, raw and anything added later are all exercised), read-only,
 * without backing files (a fuzzed header must not make us open host
 * files), and read through the public API: block status across the image
 * and reads at a few offsets.  The work per input is bounded so that a
 * huge virtual size costs nothing.  Anything but a clean refusal or a
 * clean read is a bug: a crash, a sanitizer report, a leak or a hang.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <strata/strata.h>

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  static uint8_t buf[65536];
  char path[64];
  strata_node *node;
  strata_error *err = NULL;
  int64_t len;
  uint64_t off = 0;
  int fd = memfd_create ("fuzz-image", MFD_CLOEXEC);

  if (fd < 0)
    abort ();
  if (size && write (fd, data, size) != (ssize_t) size)
    abort ();
  snprintf (path, sizeof path, "/proc/self/fd/%d", fd);
  node = strata_open (path, NULL, NULL,
                      STRATA_OPEN_FORCE_SHARE | STRATA_OPEN_NO_BACKING, &err);
  if (!node) {
    if (!strata_error_message (err)[0])
      abort ();  /* every refusal must say why */
    strata_error_free (err);
    close (fd);
    return 0;
  }
  len = strata_length (node);
  for (int i = 0; len > 0 && i < 64 && off < (uint64_t) len; i++) {
    struct strata_extent e = { .size = sizeof e };
    if (strata_block_status (node, off, len - off, &e, 0) < 0)
      break;
    off += e.length;
  }
  if (len > 0) {
    uint64_t offsets[] = { 0, (uint64_t) len / 2, (uint64_t) len - 1 };
    for (int i = 0; i < 3; i++) {
      uint64_t n = (uint64_t) len - offsets[i];
      strata_pread (node, buf, n < sizeof buf ? n : sizeof buf, offsets[i],
                    0);
    }
  }
  strata_close (node);
  close (fd);
  return 0;
}
