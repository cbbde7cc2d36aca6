"""strata-img map against qemu-img map 7.2 on image shapes QEMU's tools
make: partly written clusters (over nothing, over an empty backing file,
over a backing file with data, at the image's unaligned end), raw images
with holes, compressed and zero clusters, discards, preallocated images
and backing chains.

Every image is made by qemu-img and qemu-io only, then mapped read-only by
both tools in the same directory, so the host offsets and file names they
print must be the same, in both --output=human and --output=json.  That
includes the part of an overlay past the end of a shorter backing file
(zeros at the overlay's depth, not present) and the zero and unallocated
subclusters of an allocated cluster in an extended-L2 image, and zero
clusters that kept their allocation, which qemu-img shows with their host
offset.

qemu-img 7.2 asks the file under a qcow2 data cluster whether it is a hole
only when the image looks metadata-preallocated; otherwise a cluster
written in part is one data extent, and strata-img must say the same.
"""
import pytest

from harness import binary, need, run

KiB = 1 << 10
MiB = 1 << 20


def qemu_img():
    return need("qemu-img", "qemu-utils")


def qemu_io(d, img, *cmds, fmt="qcow2"):
    args = []
    for c in cmds:
        args += ["-c", c]
    run(need("qemu-io", "qemu-utils"), "-f", fmt, *args, img, cwd=d)


def create(d, name, size, *opts, fmt="qcow2"):
    run(qemu_img(), "create", "-q", "-f", fmt, *opts, name, str(size), cwd=d)


def overlay(d, name, backing, bfmt="qcow2", size=None):
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-b", backing, "-F", bfmt,
        name, *([str(size)] if size is not None else []), cwd=d)


# Each shape builds its images in D and returns (image, format) to map.

def partial_alone(d):
    create(d, "t.qcow2", 1 * MiB)
    qemu_io(d, "t.qcow2", "write -P 1 0 4k")
    return "t.qcow2", "qcow2"


def partial_middle_of_cluster(d):
    create(d, "t.qcow2", 1 * MiB)
    qemu_io(d, "t.qcow2", "write -P 1 70k 3k", "write -P 2 200k 512")
    return "t.qcow2", "qcow2"


def partial_over_empty_qcow2_backing(d):
    create(d, "b.qcow2", 1 * MiB)
    overlay(d, "t.qcow2", "b.qcow2")
    qemu_io(d, "t.qcow2", "write -P 1 0 4k")
    return "t.qcow2", "qcow2"


def partial_over_empty_raw_backing(d):
    create(d, "b.raw", 1 * MiB, fmt="raw")
    overlay(d, "t.qcow2", "b.raw", bfmt="raw")
    qemu_io(d, "t.qcow2", "write -P 1 64k 4k")
    return "t.qcow2", "qcow2"


def partial_over_backing_with_data(d):
    create(d, "b.qcow2", 1 * MiB)
    qemu_io(d, "b.qcow2", "write -P 9 0 256k")
    overlay(d, "t.qcow2", "b.qcow2")
    qemu_io(d, "t.qcow2", "write -P 1 4k 4k", "write -P 2 300k 4k")
    return "t.qcow2", "qcow2"


def unaligned_end(d):
    create(d, "t.qcow2", 100 * KiB + 512)
    qemu_io(d, "t.qcow2", "write -P 1 96k 2k", "write -P 2 100k 512")
    return "t.qcow2", "qcow2"


def unaligned_end_over_backing(d):
    create(d, "b.qcow2", 100 * KiB + 512)
    overlay(d, "t.qcow2", "b.qcow2")
    qemu_io(d, "t.qcow2", "write -P 1 99k 1k")
    return "t.qcow2", "qcow2"


def small_clusters(d):
    create(d, "t.qcow2", 1 * MiB, "-o", "cluster_size=4k")
    qemu_io(d, "t.qcow2", "write -P 1 0 1k", "write -P 2 8k 6k")
    return "t.qcow2", "qcow2"


def big_clusters(d):
    create(d, "t.qcow2", 8 * MiB, "-o", "cluster_size=2M")
    qemu_io(d, "t.qcow2", "write -P 1 1M 4k")
    return "t.qcow2", "qcow2"


def zero_clusters(d):
    create(d, "b.qcow2", 1 * MiB)
    qemu_io(d, "b.qcow2", "write -P 9 0 1M")
    overlay(d, "t.qcow2", "b.qcow2")
    qemu_io(d, "t.qcow2", "write -z 0 64k", "write -z 128k 4k",
            "write -P 1 256k 4k", "write -z 260k 4k")
    return "t.qcow2", "qcow2"


def discarded(d):
    create(d, "t.qcow2", 1 * MiB)
    qemu_io(d, "t.qcow2", "write -P 1 0 512k", "discard 64k 128k",
            "discard 300k 4k")
    return "t.qcow2", "qcow2"


def compressed(d):
    create(d, "s.raw", 1 * MiB, fmt="raw")
    qemu_io(d, "s.raw", "write -P 1 0 128k", "write -P 2 200k 4k",
            fmt="raw")
    run(qemu_img(), "convert", "-q", "-c", "-f", "raw", "-O", "qcow2",
        "s.raw", "t.qcow2", cwd=d)
    return "t.qcow2", "qcow2"


def compressed_then_partial(d):
    compressed(d)
    qemu_io(d, "t.qcow2", "write -P 3 512k 4k")
    return "t.qcow2", "qcow2"


def prealloc_metadata(d):
    create(d, "t.qcow2", 1 * MiB, "-o", "preallocation=metadata")
    return "t.qcow2", "qcow2"


def prealloc_metadata_partial(d):
    create(d, "t.qcow2", 1 * MiB, "-o", "preallocation=metadata")
    qemu_io(d, "t.qcow2", "write -P 1 0 4k", "write -P 2 70k 64k")
    return "t.qcow2", "qcow2"


def prealloc_falloc(d):
    create(d, "t.qcow2", 1 * MiB, "-o", "preallocation=falloc")
    qemu_io(d, "t.qcow2", "write -P 1 0 4k")
    return "t.qcow2", "qcow2"


def prealloc_full(d):
    create(d, "t.qcow2", 512 * KiB, "-o", "preallocation=full")
    qemu_io(d, "t.qcow2", "write -P 1 4k 4k")
    return "t.qcow2", "qcow2"


def chain_of_three(d):
    create(d, "a.qcow2", 1 * MiB)
    qemu_io(d, "a.qcow2", "write -P 1 0 4k", "write -P 1 512k 64k")
    overlay(d, "b.qcow2", "a.qcow2")
    qemu_io(d, "b.qcow2", "write -P 2 8k 4k", "write -z 512k 4k")
    overlay(d, "t.qcow2", "b.qcow2")
    qemu_io(d, "t.qcow2", "write -P 3 16k 4k", "write -P 3 700k 512")
    return "t.qcow2", "qcow2"


def raw_with_holes(d):
    create(d, "t.raw", 1 * MiB, fmt="raw")
    qemu_io(d, "t.raw", "write -P 1 0 4k", "write -P 2 70k 4k",
            "write -P 3 1020k 4k", fmt="raw")
    return "t.raw", "raw"


def raw_unaligned_end(d):
    create(d, "t.raw", 100 * KiB + 512, fmt="raw")
    qemu_io(d, "t.raw", "write -P 1 96k 4k", fmt="raw")
    return "t.raw", "raw"


def qcow2_over_raw_with_holes(d):
    raw_with_holes(d)
    overlay(d, "t.qcow2", "t.raw", bfmt="raw")
    qemu_io(d, "t.qcow2", "write -P 4 200k 4k")
    return "t.qcow2", "qcow2"


def past_end_of_shorter_backing(d):
    create(d, "b.qcow2", 1 * MiB)
    qemu_io(d, "b.qcow2", "write -P 1 0 64k", "write -P 1 512k 64k")
    overlay(d, "t.qcow2", "b.qcow2", size=4 * MiB)
    qemu_io(d, "t.qcow2", "write -P 2 2M 64k", "write -P 2 960k 128k")
    return "t.qcow2", "qcow2"


def past_end_of_shorter_raw_backing(d):
    create(d, "b.raw", 100 * KiB + 512, fmt="raw")
    qemu_io(d, "b.raw", "write -P 1 0 8k", fmt="raw")
    overlay(d, "t.qcow2", "b.raw", bfmt="raw", size=1 * MiB)
    qemu_io(d, "t.qcow2", "write -P 2 512k 4k")
    return "t.qcow2", "qcow2"


def short_middle_of_three(d):
    create(d, "a.qcow2", 2 * MiB)
    qemu_io(d, "a.qcow2", "write -P 1 0 2M")
    create(d, "b.qcow2", 1 * MiB, "-b", "a.qcow2", "-F", "qcow2")
    qemu_io(d, "b.qcow2", "write -P 2 64k 64k")
    overlay(d, "t.qcow2", "b.qcow2", size=3 * MiB)
    qemu_io(d, "t.qcow2", "write -P 3 1536k 4k")
    return "t.qcow2", "qcow2"


def zero_clusters_kept_allocated(d):
    create(d, "t.qcow2", 1 * MiB)
    qemu_io(d, "t.qcow2", "write -P 1 0 512k", "write -z 64k 128k",
            "write -z -u 320k 64k")
    return "t.qcow2", "qcow2"


def extended_l2(d):
    create(d, "t.qcow2", 1 * MiB, "-o", "extended_l2=on")
    qemu_io(d, "t.qcow2", "write -P 1 4k 4k", "write -P 1 128k 2k",
            "write -z 256k 8k", "write -P 3 264k 4k")
    return "t.qcow2", "qcow2"


def extended_l2_over_extended_l2(d):
    extended_l2(d)
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-b", "t.qcow2", "-F",
        "qcow2", "-o", "extended_l2=on,cluster_size=128k", "o.qcow2",
        cwd=d)
    qemu_io(d, "o.qcow2", "write -P 2 0 2k", "write -P 2 130k 4k")
    return "o.qcow2", "qcow2"


def extended_l2_past_end_of_backing(d):
    create(d, "b.qcow2", 192 * KiB)
    qemu_io(d, "b.qcow2", "write -P 1 0 192k")
    create(d, "t.qcow2", 1 * MiB, "-b", "b.qcow2", "-F", "qcow2", "-o",
           "extended_l2=on")
    qemu_io(d, "t.qcow2", "write -P 2 130k 2k", "write -P 2 200k 2k")
    return "t.qcow2", "qcow2"


SHAPES = [partial_alone, partial_middle_of_cluster,
          partial_over_empty_qcow2_backing, partial_over_empty_raw_backing,
          partial_over_backing_with_data, unaligned_end,
          unaligned_end_over_backing, small_clusters, big_clusters,
          zero_clusters, discarded, compressed,
          compressed_then_partial, prealloc_metadata,
          prealloc_metadata_partial, prealloc_falloc, prealloc_full,
          chain_of_three, raw_with_holes, raw_unaligned_end,
          qcow2_over_raw_with_holes, past_end_of_shorter_backing,
          past_end_of_shorter_raw_backing, short_middle_of_three,
          zero_clusters_kept_allocated, extended_l2,
          extended_l2_over_extended_l2, extended_l2_past_end_of_backing]


@pytest.mark.parametrize("output", ["json", "human"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda f: f.__name__)
def test_map_as_qemu_img(tmp_path, shape, output):
    img, fmt = shape(tmp_path)
    got = []
    for tool in (qemu_img(), binary("strata-img")):
        p = run(tool, "map", "-f", fmt, f"--output={output}", img,
                cwd=tmp_path, check=False)
        stderr = p.stderr.replace("qemu-img:", "PROG:").replace(
            "strata-img:", "PROG:")
        got.append((p.returncode, p.stdout, stderr))
    assert got[1] == got[0], f"qemu-img:\n{got[0][1]}\nstrata-img:\n{got[1][1]}"


def test_partial_cluster_is_one_data_extent(tmp_path):
    """The case the issue names: 4 KiB written at 0 into a 64 KiB cluster
    over an empty backing file is one data extent of 64 KiB, not a data
    extent and a zero one."""
    partial_over_empty_qcow2_backing(tmp_path)
    p = run(binary("strata-img"), "map", "--output=json", "t.qcow2",
            cwd=tmp_path)
    first = p.stdout.splitlines()[0]
    assert '"start": 0, "length": 65536, "depth": 0, "present": true, ' \
        '"zero": false, "data": true' in first, p.stdout
