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
