"""Compressed images as small as QEMU's: strata-img convert -c packs
compressed clusters back to back, running on into the next host cluster
(qcow2.txt, "Compressed Clusters Descriptor"), as qemu-img does.

The input is half compressible: each 64 KiB cluster holds 32 KiB of seeded
random bytes and 32 KiB of zeros, so it compresses to a little over half a
cluster and two of them fit in a host cluster only when one may straddle
the boundary.  qemu-img is the oracle: check (no errors, no leaks),
compare, map, and the size of its own output for the same input.
"""
import json
import os
import random
import shutil

import pytest

from harness import binary, run
from harness.crash import build_shim, crash_at, crash_env
from harness.qcow2 import qemu_img, qemu_io

CLUSTER = 65536
SEED = 20


def half_compressible(path, clusters, seed=SEED):
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(clusters):
            f.write(rnd.randbytes(CLUSTER // 2) + bytes(CLUSTER // 2))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """16 MiB of half-compressible data as raw, with a 192 KiB hole of
    zeros in the middle (skipped, as qemu-img skips it)."""
    d = tmp_path_factory.mktemp("src")
    raw = d / "src.raw"
    half_compressible(raw, 256)
    with open(raw, "r+b") as f:
        f.seek(100 * CLUSTER)
        f.write(bytes(3 * CLUSTER))
    return raw


def check_clean(img):
    out = json.loads(run(qemu_img(), "check", "--output=json", img).stdout)
    assert out["check-errors"] == 0, out
    assert out.get("leaks", 0) == 0 and out.get("corruptions", 0) == 0, out
    return out


def data_map(img):
    """qemu-img map without host offsets (they differ by design)."""
    m = json.loads(run(qemu_img(), "map", "--output=json", img).stdout)
    return [(e["start"], e["length"], e["data"], e["zero"]) for e in m]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("order", [[], ["-W"]], ids=["in-order", "W"])
def test_convert_c_as_small_as_qemu(tmp_path, src, ctype, order):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    args = ["convert", "-c", *order, "-f", "raw", "-O", "qcow2", "-o",
            f"compression_type={ctype}", src]
    run(binary("strata-img"), *args, ours)
    run(qemu_img(), *args, theirs)
    chk, qchk = check_clean(ours), check_clean(theirs)
    assert chk["compressed-clusters"] == qchk["compressed-clusters"] == 253
    run(qemu_img(), "compare", "-f", "raw", "-F", "qcow2", src, ours)
    assert data_map(ours) == data_map(theirs)
    info = json.loads(run(qemu_img(), "info", "--output=json", ours).stdout)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    size, qsize = os.path.getsize(ours), os.path.getsize(theirs)
    # Half-size clusters packed two to a host cluster: about half the
    # input, and never larger than qemu-img's.
    assert size <= qsize, (size, qsize)
    assert size >= 0.97 * qsize, (size, qsize)
    assert size < 0.6 * os.path.getsize(src), size


def test_refcount_bits_1_starts_new_host_clusters(tmp_path, src):
    """With 1-bit refcounts a host cluster holds one compressed cluster:
    the next one starts a new host cluster instead of overflowing it."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for img in (ours, theirs):
        run(qemu_img(), "create", "-q", "-f", "qcow2", "-o", "refcount_bits=1",
            img, "16M")
    args = ["convert", "-n", "-c", "-f", "raw", "-O", "qcow2", src]
    run(binary("strata-img"), *args, ours)
    run(qemu_img(), *args, theirs)
    check_clean(ours)
    run(qemu_img(), "compare", "-f", "raw", "-F", "qcow2", src, ours)
    assert os.path.getsize(ours) <= os.path.getsize(theirs)
    # Clusters that compress to a few bytes would share a host cluster
    # if the refcount could say so.
    run(binary("strata-io"), "-f", "qcow2", "-c", "write -c -P 5 0 1M", ours)
    check_clean(ours)
    p = run(qemu_io(), "-f", "qcow2", "-c", "read -P 5 0 1M", ours)
    assert "verification failed" not in p.stdout


@pytest.mark.parametrize("opts", ["cluster_size=65536",
                                  "cluster_size=65536,compression_type=zstd",
                                  "cluster_size=65536,extended_l2=on"])
def test_compressed_over_existing_clusters(tmp_path, src, opts):
    """convert -n -c onto an image that already maps normal and compressed
    clusters: the replaced clusters are freed, shared host clusters keep
    one reference per compressed cluster in them (no leak, no error)."""
    img = tmp_path / "t.qcow2"
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-o", opts, img, "16M")
    run(qemu_io(), "-f", "qcow2", "-c", "write -P 1 0 3M",
        "-c", "write -c -P 2 4M 2M", "-c", "write -c -P 3 12M 1M", img)
    run(binary("strata-img"), "convert", "-n", "-c", "-f", "raw", "-O",
        "qcow2", src, img)
    check_clean(img)
    run(qemu_img(), "compare", "-f", "raw", "-F", "qcow2", src, img)
    # And once more over the compressed clusters it wrote itself, in
    # pieces, from strata-io.
    part = tmp_path / "part.raw"
    half_compressible(part, 40, seed=SEED + 1)
    run(binary("strata-io"), "-f", "qcow2", "-c",
        f"write -c -s {part} 1M {40 * CLUSTER}", img)
    check_clean(img)
    model = tmp_path / "model.raw"
    shutil.copy(src, model)
    with open(model, "r+b") as f, open(part, "rb") as p:
        f.seek(1 << 20)
        f.write(p.read())
    run(qemu_img(), "compare", "-f", "raw", "-F", "qcow2", model, img)


def test_crash_during_compressed_writes(tmp_path, src):
    """A crash before any write or flush of a compressed write over
    existing data leaves an image qemu-img check finds consistent (leaks
    allowed), whose untouched data reads back."""
    shim = build_shim(tmp_path)
    orig, img = tmp_path / "orig.qcow2", tmp_path / "img.qcow2"
    run(qemu_img(), "create", "-q", "-f", "qcow2", orig, "8M")
    run(qemu_io(), "-f", "qcow2", "-c", "write -P 1 0 1M",
        "-c", "write -c -P 2 1M 1M", "-c", "write -P 7 7M 64k", orig)
    part = tmp_path / "part.raw"
    half_compressible(part, 24, seed=SEED + 2)
    args = ["-c", f"write -c -s {part} 512k {24 * CLUSTER}",
            "-c", "flush", "-c", f"write -c -s {part} 4M {24 * CLUSTER}"]
    shutil.copy(orig, img)
    count = tmp_path / "count"
    run(binary("strata-io"), "-f", "qcow2", *args, img,
        env=crash_env(shim, img, CRASH_COUNT=count))
    total = int(count.read_text().split()[0])
    assert total > 3
    for n in range(1, total + 1):
        for lose in (0, 1, 3):
            crash_at(shim, orig, img, args, n, lose, total)
            r = run(qemu_io(), "-f", "qcow2", "-c", "read -q 0 8M",
                    "-c", "read -q -P 1 0 512k", "-c", "read -q -P 7 7M 64k",
                    img, check=False)
            assert r.returncode == 0 and "fail" not in r.stdout, (
                f"crash before event {n}/{total} (lose={lose}):\n{r.stdout}")
