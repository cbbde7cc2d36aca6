/* strata: the public header's contract (include/strata/strata.h): every
 * entry point that takes flags refuses a bit outside its mask with EINVAL
 * (through errp on the control path, as -EINVAL on the data path), and a
 * caller-sized result struct smaller than the library's first version is
 * refused.  A qcow2 image over a qcow2 backing file gives every call
 * something to work on, so a failure here is the flag check and nothing
 * else. */
#include <stdio.h>

#include <strata/strata.h>

#include "test.h"

#define BAD (1u << 31) /* a bit no call accepts */

static char *base_path, *top_path;

static char *
make_qcow2 (const char *name, const char *backing)
{
  char *path, *o;

  CHECK (asprintf (&path, "%s/%s", test_tmpdir (), name) > 0);
  if (backing)
    CHECK (asprintf (&o, "size=1M,backing_file=%s,backing_fmt=qcow2", backing)
           > 0);
  else
    CHECK ((o = strdup ("size=1M")) != NULL);
  CHECK (strata_create (path, "qcow2", o, 0, NULL));
  free (o);
  return path;
}

static strata_node *
open_top (void)
{
  strata_node *n;

  if (!base_path) {
    base_path = make_qcow2 ("base.qcow2", NULL);
    top_path = make_qcow2 ("top.qcow2", base_path);
  }
  n = strata_open (top_path, "qcow2", NULL, STRATA_OPEN_RDWR, NULL);
  CHECK (n && strata_backing (n));
  return n;
}

/* A control-path call failed with EINVAL through ERR; frees it. */
static void
check_einval (bool ok, strata_error *err)
{
  CHECK (!ok);
  CHECK (err && strata_error_errno (err) == EINVAL);
  CHECK_STR_CONTAINS (strata_error_message (err), "unknown flags");
  strata_error_free (err);
}

/* CALL (which passes &e_) must fail with EINVAL through e_. */
#define REFUSED(call)                                                         \
  do {                                                                        \
    strata_error *e_ = NULL;                                                  \
    bool ok_ = (call);                                                        \
    check_einval (ok_, e_);                                                   \
  } while (0)

static void
test_data_path_flags (void)
{
  strata_node *n = open_top ();
  char buf[512] = { 0 };
  struct iovec iov = { .iov_base = buf, .iov_len = sizeof buf };
  struct strata_extent e = { .size = sizeof e };
  uint64_t copied = 1;

  CHECK (strata_pread (n, buf, sizeof buf, 0, BAD) == -EINVAL);
  CHECK_STR_CONTAINS (strata_last_error_message (), "unknown flags");
  CHECK (strata_pwrite (n, buf, sizeof buf, 0, BAD) == -EINVAL);
  CHECK (strata_preadv (n, &iov, 1, 0, STRATA_REQ_FUA) == -EINVAL);
  CHECK (strata_pwritev (n, &iov, 1, 0, STRATA_REQ_MAY_UNMAP) == -EINVAL);
  CHECK (strata_pwrite_zeroes (n, 0, 512, STRATA_REQ_COMPRESSED) == -EINVAL);
  CHECK (strata_pdiscard (n, 0, 512, BAD) == -EINVAL);
  CHECK (strata_flush (n, BAD) == -EINVAL);
  CHECK (strata_prefetch (n, 0, 512, BAD) == -EINVAL);
  CHECK (strata_copy_up (n, NULL, 0, 512, &copied, BAD) == -EINVAL);
  CHECK (copied == 0);
  CHECK (strata_block_status (n, 0, 512, &e, BAD) == -EINVAL);
  /* The accepted bits still work. */
  CHECK (strata_pwrite (n, buf, sizeof buf, 0, STRATA_REQ_FUA) == 0);
  CHECK (strata_block_status (n, 0, 512, &e, STRATA_BS_SHALLOW) == 0);
  CHECK (strata_copy_up (n, NULL, 0, 4096, &copied, 0) == 0);
  strata_close (n);
}

static void
test_control_path_flags (void)
{
  strata_node *n = open_top ();
  strata_node *b = strata_backing (n);
  struct strata_info info = { .size = sizeof info };
  struct strata_qcow2_info q = { .size = sizeof q };
  struct strata_check_result res = { .size = sizeof res };
  struct strata_snapshot_info **list = NULL;
  size_t count = 0;
  uint64_t req, full;
  char *path;

  CHECK (asprintf (&path, "%s/new.qcow2", test_tmpdir ()) > 0);
  REFUSED (strata_open (top_path, "qcow2", NULL, BAD, &e_) != NULL);
  REFUSED (strata_truncate (n, 1 << 20, BAD, &e_));
  REFUSED (strata_reopen (n, true, BAD, &e_));
  REFUSED (strata_get_info (n, &info, BAD, &e_));
  REFUSED (strata_get_qcow2_info (n, &q, BAD, &e_));
  REFUSED (strata_check (n, &res, NULL, NULL, BAD, &e_));
  REFUSED (strata_create (path, "qcow2", "size=1M", BAD, &e_));
  CHECK (access (path, F_OK) != 0); /* refused before touching the disk */
  REFUSED (strata_change_backing_file (n, NULL, NULL, BAD, &e_));
  REFUSED (strata_make_empty (n, BAD, &e_));
  REFUSED (strata_snapshot_list (n, &list, &count, BAD, &e_));
  CHECK (list == NULL && count == 0);
  REFUSED (strata_snapshot_create (n, "s", BAD, &e_));
  REFUSED (strata_snapshot_apply (n, "s", BAD, &e_));
  REFUSED (strata_snapshot_delete (n, "s", BAD, &e_));
  REFUSED (strata_amend (n, "lazy_refcounts=on", BAD, &e_));
  REFUSED (strata_measure ("qcow2", "size=1M", NULL, &req, &full, BAD, &e_));
  REFUSED (strata_chain_find (n, base_path, BAD, NULL, &e_) != NULL);
  REFUSED (strata_chain_find_node (n, "x", BAD, &e_) != NULL);
  {
    struct strata_bitmap_info **bl = NULL;
    size_t nb = 0;
    REFUSED (strata_bitmap_list (n, &bl, &nb, BAD, &e_));
  }
  REFUSED (strata_chain_backing_name (n, b, BAD, &e_) != NULL);
  /* Nothing was changed by the refused calls. */
  CHECK (strata_get_info (n, &info, 0, NULL) && info.backing_filename);
  CHECK (strata_snapshot_list (n, &list, &count, 0, NULL) && count == 0);
  strata_snapshot_list_free (list, count);
  free (path);
  strata_close (n);
}

static void
test_sized_structs (void)
{
  strata_node *n = open_top ();
  struct strata_info info = { .size = 4 };
  struct strata_qcow2_info q = { .size = 0 };
  struct strata_check_result res = { .size = 8 };
  struct strata_extent e = { .size = 0 };
  strata_error *err = NULL;

  CHECK (!strata_get_info (n, &info, 0, &err));
  CHECK (err && strata_error_errno (err) == EINVAL);
  strata_error_free (err), err = NULL;
  CHECK (!strata_get_qcow2_info (n, &q, 0, NULL));
  CHECK (!strata_check (n, &res, NULL, NULL, 0, NULL));
  CHECK (strata_block_status (n, 0, 512, &e, 0) == -EINVAL);
  /* A caller's size is kept; the library fills the rest. */
  info.size = sizeof info;
  q.size = sizeof q;
  CHECK (strata_get_info (n, &info, 0, NULL));
  CHECK (info.size == sizeof info && strcmp (info.format, "qcow2") == 0);
  CHECK (strcmp (info.format_specific, "qcow2") == 0);
  CHECK (strata_get_qcow2_info (n, &q, 0, NULL) && q.size == sizeof q);
  CHECK (strcmp (q.compat, "1.1") == 0 && q.refcount_bits == 16);
  strata_close (n);
}

static void
test_qcow2_info_refused_for_raw (void)
{
  char *img = test_make_image ("plain.raw", 65536);
  strata_node *n = strata_open (img, "raw", NULL, 0, NULL);
  struct strata_qcow2_info q = { .size = sizeof q };
  strata_error *err = NULL;

  CHECK (n);
  CHECK (!strata_get_qcow2_info (n, &q, 0, &err));
  CHECK (err && strata_error_errno (err) == ENOTSUP);
  strata_error_free (err);
  strata_close (n);
  free (img);
}

/* strata_check returns bool: true when the check ran to the end, false
 * with the reason in errp (EROFS: a repair asked of a read-only node). */
static void
test_check_return_shape (void)
{
  strata_node *n = open_top ();
  strata_node *ro;
  struct strata_check_result res = { .size = sizeof res };
  strata_error *err = NULL;

  CHECK (strata_check (n, &res, NULL, NULL, 0, &err) && !err);
  CHECK (res.size == sizeof res && res.corruptions == 0 && res.leaks == 0);
  CHECK (res.total_clusters > 0);
  strata_close (n);
  ro = strata_open (top_path, "qcow2", NULL, 0, NULL);
  CHECK (ro);
  CHECK (!strata_check (ro, &res, NULL, NULL, STRATA_CHECK_FIX_LEAKS, &err));
  CHECK (err && strata_error_errno (err) == EROFS);
  strata_error_free (err);
  strata_close (ro);
}

TESTS (T (test_data_path_flags), T (test_control_path_flags),
       T (test_sized_structs), T (test_qcow2_info_refused_for_raw),
       T (test_check_return_shape))
