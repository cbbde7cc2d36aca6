"""strata-io refuses hostile qcow2 images cleanly.

Each image is made by QEMU and then patched with struct.  strata-io must
exit non-zero (not by a signal), print exactly one line that names the
problem, finish quickly, and leave the file's bytes unchanged.
"""
import os
import re
import struct

import pytest

from harness import file_state, run
from harness.qcow2 import KiB, MiB, create, header, patch, qemu_img, qio, sio

CS = 64 * KiB


def base_image(tmp_path, name="h.qcow2"):
    img = tmp_path / name
    create(img, 4 * MiB, cluster_size=CS)
    qio(img, ["write -q -P 0x11 0 64k"])
    return img


def l2_offset(img):
    h = header(img)
    with open(img, "rb") as f:
        f.seek(h["l1_table_offset"])
        return struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00


def find_extension(img, magic):
    with open(img, "rb") as f:
        data = f.read(CS)
    off = header(img)["header_length"]
    while off + 8 <= len(data):
        t, n = struct.unpack(">II", data[off:off + 8])
        if t == magic:
            return off + 8, n
        if t == 0:
            break
        off += 8 + (n + 7) // 8 * 8
    raise AssertionError(f"extension 0x{magic:08x} not found")


def truncated(img, tmp_path):
    os.truncate(img, 50)


def cluster_bits_30(img, tmp_path):
    patch(img, 20, ">I", 30)


def huge_l1(img, tmp_path):
    patch(img, 36, ">I", 0x7fffffff)


def l1_past_file_size(img, tmp_path):
    patch(img, 36, ">I", 0x100000)   # 8 MiB of L1 in a small file


def huge_refcount_table(img, tmp_path):
    patch(img, 56, ">I", 0x10000000)


def l1_unaligned(img, tmp_path):
    patch(img, 40, ">Q", header(img)["l1_table_offset"] + 8)


def l1_past_eof(img, tmp_path):
    patch(img, 40, ">Q", 1 << 40)


def refcount_table_past_eof(img, tmp_path):
    patch(img, 48, ">Q", 1 << 40)


def l2_into_header(img, tmp_path):
    patch(img, l2_offset(img), ">Q", 1 << 63)


def compressed_entry(img, host_offset, sectors):
    """Cluster 0 becomes a compressed cluster of SECTORS 512-byte sectors
    at HOST_OFFSET (64 KiB clusters: offset in bits 0-53, sectors - 1 in
    bits 54-61)."""
    patch(img, l2_offset(img), ">Q",
          1 << 62 | (sectors - 1) << 54 | host_offset)


def compressed_past_eof(img, tmp_path):
    compressed_entry(img, 1 << 40, 4)


def compressed_runs_past_eof(img, tmp_path):
    # Starts in the file's last 100 bytes and claims 64 KiB more: what is
    # there is not a compressed cluster, and the rest is past the end.
    compressed_entry(img, os.path.getsize(img) - 100, 128)


def l2_unaligned(img, tmp_path):
    patch(img, l2_offset(img), ">Q", (1 << 63) | (3 * CS + 512))


def backing_name_4g(img, tmp_path):
    patch(img, 8, ">QI", 0x200, 0xffffffff)


def unknown_incompat(img, tmp_path):
    patch(img, 72, ">Q", header(img)["incompatible_features"] | 1 << 20)


def named_incompat(img, tmp_path):
    """The name comes from the image's own feature name table."""
    off, n = find_extension(img, 0x6803f857)
    with open(img, "rb") as f:
        f.seek(off)
        table = f.read(n)
    for i in range(0, n, 48):
        if table[i] == 0 and table[i + 1] == 0:   # "dirty bit"
            patch(img, off + i, ">BB46s", 0, 21, b"frobnicator")
    patch(img, 72, ">Q", header(img)["incompatible_features"] | 1 << 21)


def external_data_file(img, tmp_path):
    patch(img, 72, ">Q", header(img)["incompatible_features"] | 1 << 2)


def backing_loop(img, tmp_path):
    other = tmp_path / "other.qcow2"
    create(other, 4 * MiB, backing=img.name, cluster_size=CS)
    run(qemu_img(), "rebase", "-u", "-b", other.name, "-F", "qcow2", img.name,
        cwd=tmp_path)


def backing_without_format(img, tmp_path):
    base_image(tmp_path, "b.qcow2")
    run(qemu_img(), "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", img.name,
        cwd=tmp_path)
    off, _ = find_extension(img, 0xe2792aca)
    patch(img, off - 8, ">I", 0xe2792acb)   # now an unknown extension


CASES = {
    # name: (patch, commands, text the one line must contain)
    "truncated": (truncated, [], "file size 50 is too small"),
    "cluster-bits-30": (cluster_bits_30, [], "cluster_bits 30 is out of range"),
    "huge-l1": (huge_l1, [], "l1_size 2147483647 is too large"),
    "l1-past-file-size": (l1_past_file_size, [],
                          "plus 8388608 bytes is past the end of the file"),
    "huge-refcount-table": (huge_refcount_table, [],
                            "refcount table size 17592186044416 bytes is "
                            "too large"),
    "l1-unaligned": (l1_unaligned, [], "is not aligned to the cluster size"),
    "l1-past-eof": (l1_past_eof, [], "past the end of the file"),
    "refcount-table-past-eof": (refcount_table_past_eof, [],
                                "refcount table offset 0x10000000000 plus"),
    "l2-into-header": (l2_into_header, ["read 0 512"],
                       "points into the image header"),
    "compressed-past-eof": (compressed_past_eof, ["read 0 512"],
                            "is outside the file's data area"),
    "compressed-runs-past-eof": (compressed_runs_past_eof, ["read 0 512"],
                                 "does not decompress to a cluster"),
    "l2-unaligned": (l2_unaligned, ["read 0 512"],
                     "is not aligned to the cluster size"),
    "backing-name-4g": (backing_name_4g, [],
                        "backing file name length 4294967295 is too long"),
    "unknown-incompat": (unknown_incompat, [],
                         "incompatible feature bit 20 (unknown)"),
    "named-incompat": (named_incompat, [],
                       "incompatible feature bit 21 (frobnicator)"),
    "external-data-file": (external_data_file, [], "(external data file)"),
    "backing-loop": (backing_loop, [], "loop in the backing chain"),
    "backing-without-format": (backing_without_format, [],
                               "has no backing format"),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_hostile(tmp_path, name, mode):
    fix, cmds, want = CASES[name]
    img = base_image(tmp_path)
    fix(img, tmp_path)
    before = file_state(img)
    extra = ["-r"] if mode == "ro" else []
    p = sio(img, cmds, check=False, extra=extra, timeout=10)
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
    assert p.returncode > 0, f"exit {p.returncode}\n{p.stdout}{p.stderr}"
    assert len(lines) == 1 and want in lines[0], (
        f"want one line with {want!r}, got:\n{p.stdout}{p.stderr}")
    assert file_state(img) == before


def set_incompat_bit(img, bit):
    patch(img, 72, ">Q", header(img)["incompatible_features"] | 1 << bit)


def test_corrupt_read_only(tmp_path):
    img = base_image(tmp_path)
    set_incompat_bit(img, 1)
    before = file_state(img)
    p = sio(img, ["read -P 0x11 0 64k"], check=False)
    assert p.returncode == 1
    assert "corrupt" in p.stderr and "qemu-img check -r all" in p.stderr, \
        p.stderr
    sio(img, ["read -q -P 0x11 0 64k"], extra=["-r"])
    p = sio(img, ["reopen -w"], extra=["-r"], check=False)
    assert p.returncode == 1 and "qemu-img check -r all" in p.stderr
    assert file_state(img) == before


@pytest.mark.parametrize("how", ["open", "reopen"])
def test_dirty_bit_repaired_when_writable(tmp_path, how):
    """As in QEMU, a read-write open checks and repairs the refcounts of a
    dirty image and clears the bit (test_qcow2_dirty.py covers real stale
    refcounts); a read-only open changes nothing."""
    img = base_image(tmp_path)
    set_incompat_bit(img, 0)
    before = file_state(img)
    sio(img, ["read -q -P 0x11 0 64k"], extra=["-r"])
    assert file_state(img) == before
    if how == "open":
        sio(img, ["read -q -P 0x11 0 64k"])
    else:
        sio(img, ["reopen -w", "write -q -P 0x12 0 512"], extra=["-r"])
    assert header(img)["incompatible_features"] & 1 == 0


def test_l2_cache_size_option(tmp_path):
    img = tmp_path / "c.qcow2"
    create(img, 4 * MiB, cluster_size=512)
    qio(img, ["write -q -P 0x21 0 2M"])
    sio(img, ["read -q -P 0x21 0 2M", "read -q -P 0 2M 2M"],
        extra=["-o", "l2-cache-size=1k"])
    p = sio(img, ["read 0 1"], extra=["-o", "l2-cache-size=1T"], check=False)
    assert p.returncode == 1 and "l2-cache-size" in p.stderr


def make_chain(tmp_path, n):
    """l0 <- l1 <- ... <- l{n-1}, by patching copies of one small image."""
    create(tmp_path / "l0000.qcow2", 64 * KiB, cluster_size=512)
    qio(tmp_path / "l0000.qcow2", ["write -q -P 0x5e 0 512"])
    create(tmp_path / "tmpl.qcow2", 64 * KiB, backing="l0000.qcow2",
           cluster_size=512)
    h = header(tmp_path / "tmpl.qcow2")
    data = (tmp_path / "tmpl.qcow2").read_bytes()
    off = h["backing_file_offset"]
    assert h["backing_file_size"] == len("l0000.qcow2")
    for i in range(1, n):
        name = f"l{i - 1:04d}.qcow2".encode()
        img = data[:off] + name + data[off + len(name):]
        (tmp_path / f"l{i:04d}.qcow2").write_bytes(img)
    return tmp_path / f"l{n - 1:04d}.qcow2"


def test_deep_chain_refused(tmp_path):
    top = make_chain(tmp_path, 300)
    before = file_state(top)
    p = sio(top, ["read 0 512"], check=False, extra=["-r"], timeout=20)
    assert p.returncode == 1 and "exceeds 256" in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) == 1
    assert file_state(top) == before


def test_long_chain_reads(tmp_path):
    top = make_chain(tmp_path, 100)
    sio(top, ["read -q -P 0x5e 0 512", "read -q -P 0 512 63k"], extra=["-r"])


# ASan exits 1 like a refused image would; UBSan only prints.
SANITIZER = r"Sanitizer|runtime error:"

FUZZ_SEEDS = ([int(os.environ["STRATA_SEED"])] if os.environ.get("STRATA_SEED")
              else list(range(1, 9)))


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_random_metadata_corruption(tmp_path, seed):
    """Random bytes in the header, L1, L2 and refcount clusters: strata-io
    may refuse the image or some reads, but never crashes or hangs, and a
    read-only open changes nothing."""
    import random
    rng = random.Random(seed)
    img = tmp_path / "f.qcow2"
    kind = rng.choice(["plain", "extl2", "compressed"])
    if kind == "compressed":
        raw = tmp_path / "src.raw"
        raw.write_bytes(b"\x11" * 100 * KiB + bytes(800 * KiB)
                        + b"\x12" * 124 * KiB)
        run(qemu_img(), "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
            "cluster_size=4k,compression_type="
            + rng.choice(["zlib", "zstd"]), raw, img)
    else:
        create(img, 1 * MiB, cluster_size=(32 if kind == "extl2" else 4) * KiB,
               **({"extended_l2": "on"} if kind == "extl2" else {}))
        qio(img, ["write -q -P 0x11 0 100k", "write -q -z 200k 8k",
                  "write -q -P 0x12 900k 4k"])
    h = header(img)
    meta = [0, h["l1_table_offset"], h["refcount_table_offset"],
            l2_offset(img)]
    data = bytearray(img.read_bytes())
    cs = 1 << h["cluster_bits"]
    for _ in range(rng.randint(1, 6)):
        base = rng.choice(meta)
        pos = base + rng.randrange(0, cs if base else 120)
        data[pos] = rng.randrange(256)
    img.write_bytes(bytes(data))
    before = file_state(img)
    msg = f"STRATA_SEED={seed} ({kind})"
    p = sio(img, ["read -q 0 1M", "map"], check=False, extra=["-r"],
            timeout=10)
    assert p.returncode in (0, 1), f"{msg}: exit {p.returncode}\n{p.stderr}"
    assert not re.search(SANITIZER, p.stderr), f"{msg}\n{p.stderr}"
    assert file_state(img) == before, msg
    p = sio(img, ["write -q -P 0x55 4000 10000", "write -q -z 0 1M",
                  "discard -q 0 1M"], check=False, timeout=10)
    assert p.returncode in (0, 1), f"{msg}: exit {p.returncode}\n{p.stderr}"
    assert not re.search(SANITIZER, p.stderr), f"{msg}\n{p.stderr}"
