/* strata: qcow2 compressed clusters (qcow2.txt "Compressed Clusters
 * Descriptor", header byte 104 compression_type).
 *
 * A compressed cluster is a stream that decompresses to exactly one
 * cluster: raw deflate (no zlib header, 4 KiB window or larger) for
 * compression_type 0, a zstd frame for type 1.  The stored length is
 * rounded up to 512-byte sectors, so input may carry trailing bytes that
 * belong to nothing (or to the next compressed cluster); decompression
 * stops when the cluster is full.  The input is untrusted: a stream that
 * ends early or fails to decode is EIO, never a short cluster.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

static int
inflate_raw (const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
  z_stream z = { 0 };
  int r;

  if (inflateInit2 (&z, -15) != Z_OK)
    return -ENOMEM;
  z.next_in = (Bytef *) in;
  z.avail_in = inlen;
  z.next_out = out;
  z.avail_out = outlen;
  r = inflate (&z, Z_FINISH);
  inflateEnd (&z);
  /* Z_BUF_ERROR with a full output: the padding was not consumed. */
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK)
      && z.avail_out == 0)
    return 0;
  return -EIO;
}

static int
unzstd (const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
  ZSTD_DStream *d = ZSTD_createDStream ();
  ZSTD_inBuffer ib = { in, inlen, 0 };
  ZSTD_outBuffer ob = { out, outlen, 0 };
  int r = -EIO;

  if (!d)
    return -ENOMEM;
  while (ob.pos < ob.size && ib.pos < ib.size) {
    size_t ret = ZSTD_decompressStream (d, &ob, &ib);
    if (ZSTD_isError (ret))
      break;
    if (ret == 0)  /* end of frame */
      break;
  }
  if (ob.pos == ob.size)
    r = 0;
  ZSTD_freeDStream (d);
  return r;
}

int
qcow2_decompress (strata_node *node, uint64_t coffset, uint64_t csize,
                  uint8_t *out)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *in = NULL;
  uint64_t avail;
  int64_t flen = node_length (node->file);
  int r;

  /* A cluster never needs more than its size plus a sector of overhead;
   * bound the input so a hostile descriptor cannot demand gigabytes. */
  if (csize > 2 * s->cluster_size + 512)
    return io_error (EIO, "%s: compressed cluster at 0x%" PRIx64 " length %"
                     PRIu64 " is too large", node->filename, coffset, csize);
  if (flen < 0)
    return (int) flen;
  avail = coffset < (uint64_t) flen ? (uint64_t) flen - coffset : 0;
  csize = MIN (csize, avail);
  if (csize == 0 || !(in = malloc (csize)))
    return csize ? -ENOMEM
                 : io_error (EIO, "%s: compressed cluster at 0x%" PRIx64
                             " is past the end of the file", node->filename,
                             coffset);
  if ((r = node_pread (node->file, coffset, in, csize, 0)) < 0)
    return r;
  r = s->compression == QCOW2_COMP_ZSTD
          ? unzstd (in, csize, out, s->cluster_size)
          : inflate_raw (in, csize, out, s->cluster_size);
  if (r == -EIO)
    return io_error (EIO, "%s: compressed cluster at 0x%" PRIx64 " (%" PRIu64
                     " bytes, %s) does not decompress to a cluster",
                     node->filename, coffset, csize,
                     s->compression == QCOW2_COMP_ZSTD ? "zstd" : "zlib");
  return r;
}

/* ---- compressed writes (qemu-img convert -c, qemu-io write -c) ----
 *
 * Each guest cluster is compressed on its own (raw deflate or a zstd
 * frame).  When that does not save space it is written normally.
 * Otherwise the bytes are packed into host clusters one after another
 * (byte granular, as QEMU packs them), never straddling a host cluster,
 * so each compressed cluster lives in exactly one host cluster and that
 * cluster's refcount is the number of compressed clusters in it.  Order:
 * reserve the bytes and raise the refcount, write the data, flush, point
 * the L2 entry at it, flush, then drop the old mapping.
 */

/* Compress the cluster in IN; returns the compressed length, or 0 when it
 * does not fit in LIMIT bytes, or a negative errno. */
static ssize_t
compress_cluster (const struct qcow2_state *s, const uint8_t *in,
                  uint8_t *out, size_t limit)
{
  if (s->compression == QCOW2_COMP_ZSTD) {
    size_t n = ZSTD_compress (out, limit, in, s->cluster_size, 3);
    return ZSTD_isError (n) ? 0 : (ssize_t) n;
  }
  else {
    z_stream z = { 0 };
    ssize_t n = 0;
    int r;

    /* Raw deflate with a 4 KiB window, which every reader accepts. */
    if (deflateInit2 (&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                      Z_DEFAULT_STRATEGY) != Z_OK)
      return -ENOMEM;
    z.next_in = (Bytef *) in;
    z.avail_in = s->cluster_size;
    z.next_out = out;
    z.avail_out = limit;
    r = deflate (&z, Z_FINISH);
    if (r == Z_STREAM_END)
      n = limit - z.avail_out;
    deflateEnd (&z);
    return n;
  }
}

/* Reserve LEN bytes for compressed data; returns the host offset. */
static int64_t
reserve_compressed_locked (strata_node *node, uint64_t len)
{
  struct qcow2_state *s = node->opaque;
  uint64_t off = s->compressed_next;
  int64_t host;
  int r;

  if (off && (off & (s->cluster_size - 1))
      && (off & (s->cluster_size - 1)) + len <= s->cluster_size) {
    /* Share the partly used host cluster: one more reference to it. */
    if ((r = qcow2_refcount_update_locked (node, ROUND_DOWN (off,
                                                             s->cluster_size),
                                           1)) < 0)
      return r;
    s->compressed_next = off + len;
    return off;
  }
  if ((host = qcow2_alloc_cluster_locked (node)) < 0)
    return host;
  s->compressed_next = host + len;
  return host;
}

/* Store CLEN compressed bytes in OUT as guest cluster GUEST.  The caller
 * holds a serialising tracker entry for that cluster. */
static int
store_compressed (strata_node *node, uint64_t guest, const uint8_t *out,
                  uint64_t clen)
{
  struct qcow2_state *s = node->opaque;
  uint64_t entry, bitmap, l2_offset, old, desc;
  int64_t host;
  int r;

  pthread_mutex_lock (&node->lock);
  host = reserve_compressed_locked (node, clen);
  pthread_mutex_unlock (&node->lock);
  if (host < 0)
    return (int) host;
  if ((r = node_pwrite (node->file, host, out, clen, 0)) < 0
      || (r = node_flush (node->file)) < 0)
    return r;
  desc = qcow2_compressed_entry (s, (uint64_t) host, clen);

  pthread_mutex_lock (&node->lock);
  r = qcow2_get_l2_entry_locked (node, guest, &entry, &bitmap, &l2_offset);
  old = l2_offset ? entry : 0;
  if (r == 0)
    r = qcow2_set_l2_entry_locked (node, guest, desc, 0);
  if (r == 0 && (old & (QCOW2_OFLAG_COMPRESSED | QCOW2_OFFSET_MASK))) {
    if ((r = node_flush (node->file)) == 0)
      r = qcow2_free_entry_locked (node, old);
  }
  pthread_mutex_unlock (&node->lock);
  return r;
}

int
qcow2_pwritev_compressed (strata_node *node, uint64_t offset, uint64_t len,
                          const struct iovec *iov, int iovcnt, unsigned flags)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *in = NULL, *out = NULL;
  uint64_t done = 0;
  int r = 0, i = 0;
  size_t iov_off = 0;

  if ((r = qcow2_writes_refused (node)) < 0)
    return r;
  if (offset & (s->cluster_size - 1)
      || (len & (s->cluster_size - 1) && offset + len != s->size))
    return io_error (EINVAL, "%s: a compressed write must cover whole "
                     "clusters of %" PRIu64 " bytes (offset %" PRIu64
                     " length %" PRIu64 ")", node->filename, s->cluster_size,
                     offset, len);
  if (!(in = malloc (s->cluster_size)) || !(out = malloc (s->cluster_size)))
    return -ENOMEM;
  while (done < len && r == 0) {
    uint64_t n = MIN (len - done, s->cluster_size), got = 0;
    struct tracked_req req;
    ssize_t clen;

    /* Gather one cluster from the caller's buffers; pad the image's
     * partial last cluster with zeros. */
    memset (in + n, 0, s->cluster_size - n);
    while (got < n) {
      size_t take = MIN (iov[i].iov_len - iov_off, n - got);
      memcpy (in + got, (uint8_t *) iov[i].iov_base + iov_off, take);
      got += take;
      iov_off += take;
      if (iov_off == iov[i].iov_len && i + 1 < iovcnt) {
        i++;
        iov_off = 0;
      }
    }
    clen = compress_cluster (s, in, out, s->cluster_size - 1);
    if (clen < 0)
      r = (int) clen;
    else if (clen == 0) {
      /* Incompressible: store it as an ordinary cluster. */
      struct iovec v = { .iov_base = in, .iov_len = n };
      r = qcow2_pwritev (node, offset + done, n, &v, 1, 0);
    }
    else {
      tracker_begin (&s->clusters, &req, offset + done, s->cluster_size,
                     true);
      r = store_compressed (node, offset + done, out, clen);
      tracker_end (&s->clusters, &req);
    }
    done += n;
  }
  if (r == 0 && (flags & STRATA_REQ_FUA))
    r = node_flush (node);
  return r;
}
