"""strata-io on raw images, with qemu-io and qemu-img as the oracle.

Data written by one tool must read back through the other, byte for byte,
and strata-io's output lines must be qemu-io's for the same commands.
Every test also keeps a Python model of the image where it can, so a
mistake shared by both readers would still show.
"""
import json
import os
import random
import re
import shutil

import pytest

from harness import drop_timing, io_cmds, make_image, run

KiB = 1024
MiB = 1024 * 1024
CHUNK = 4 * MiB  # strata-io's bytes per call: multi-chunk requests cross it


def strata(strata_io, img, *cmds, opts=("-f", "raw"), check=True):
    return run(strata_io, *opts, *io_cmds(*cmds), img, check=check)


def qemu(qemu_io, img, *cmds, opts=("-f", "raw"), check=True):
    return run(qemu_io, *opts, *io_cmds(*cmds), img, check=check)


def assert_reads(tool, img, checks, opts=("-f", "raw")):
    """Run TOOL's 'read -P' for each (pattern, offset, length) and assert
    that every one verified."""
    cmds = [f"read -P {p:#x} {o} {n}" for p, o, n in checks]
    proc = run(tool, *opts, *io_cmds(*cmds), img, check=False)
    assert "Pattern verification failed" not in proc.stdout, (
        f"{tool} {cmds}:\n{proc.stdout}")
    assert proc.returncode == 0, f"{tool}:\n{proc.stdout}{proc.stderr}"
    for _, o, n in checks:
        assert f"read {n}/{n} bytes at offset {o}" in proc.stdout


def apply_write(model, pattern, off, length):
    model[off:off + length] = bytes([pattern]) * length


# Mixed aligned and unaligned (pattern, offset, length) writes in 1 MiB.
WRITES = [
    (0x11, 0, 512),
    (0x22, 1, 1000),
    (0x33, 4095, 2),
    (0x44, 65537, 70001),
    (0x55, 300000, 4096),
    (0xfe, MiB - 1, 1),
]


def test_strata_writes_qemu_reads(tmp_path, strata_io, qemu_io):
    img = make_image(tmp_path / "a.raw", MiB)
    model = bytearray(MiB)
    proc = strata(strata_io, img,
                  *[f"write -P {p:#x} {o} {n}" for p, o, n in WRITES])
    for p, o, n in WRITES:
        apply_write(model, p, o, n)
        assert f"wrote {n}/{n} bytes at offset {o}" in proc.stdout
    # WRITES overlap in order, so check the bytes each write left behind.
    assert_reads(qemu_io, img, [(0x11, 0, 1), (0x22, 1, 1000),
                                (0x33, 4095, 2), (0x44, 65537, 70001),
                                (0x00, 135538, 300000 - 135538),
                                (0x55, 300000, 4096), (0xfe, MiB - 1, 1)])
    assert img.read_bytes() == model


def test_qemu_writes_strata_reads(tmp_path, strata_io, qemu_io):
    img = make_image(tmp_path / "a.raw", MiB)
    model = bytearray(MiB)
    qemu(qemu_io, img, *[f"write -P {p:#x} {o} {n}" for p, o, n in WRITES])
    for p, o, n in WRITES:
        apply_write(model, p, o, n)
    assert img.read_bytes() == model
    assert_reads(strata_io, img, [(0x11, 0, 1), (0x22, 1, 1000),
                                  (0x33, 4095, 2), (0x44, 65537, 70001),
                                  (0x00, 135538, 300000 - 135538),
                                  (0x55, 300000, 4096), (0xfe, MiB - 1, 1)])
    # A wrong byte must be caught: strata-io is not just printing "read".
    proc = strata(strata_io, img, "read -P 0x44 65536 2", check=False)
    assert proc.returncode == 1
    assert "Pattern verification failed at offset 65536, 2 bytes" \
        in proc.stdout


def qemu_map(qemu_img, img):
    out = run(qemu_img, "map", "--output=json", "-f", "raw", img).stdout
    return json.loads(out)


def extent_at(extents, offset):
    for e in extents:
        if e["start"] <= offset < e["start"] + e["length"]:
            return e
    raise AssertionError(f"no extent at {offset} in {extents}")


def test_zero_writes_both_ways(tmp_path, strata_io, qemu_io, qemu_img):
    img = make_image(tmp_path / "z.raw", 2 * MiB)
    qemu(qemu_io, img, f"write -P 0xff 0 {2 * MiB}")
    proc = strata(strata_io, img, "write -z 3 5000",
                  f"write -z -u {64 * KiB} {128 * KiB}",
                  "write -z -u 300001 9999")
    assert "wrote 5000/5000 bytes at offset 3" in proc.stdout
    assert f"wrote {128 * KiB}/{128 * KiB} bytes at offset {64 * KiB}" \
        in proc.stdout
    assert "wrote 9999/9999 bytes at offset 300001" in proc.stdout
    assert_reads(qemu_io, img, [
        (0xff, 0, 3), (0, 3, 5000), (0xff, 5003, 64 * KiB - 5003),
        (0, 64 * KiB, 128 * KiB), (0xff, 192 * KiB, 300001 - 192 * KiB),
        (0, 300001, 9999), (0xff, 310000, 2 * MiB - 310000)])
    # -u may unmap: the aligned block range must have become a hole.
    e = extent_at(qemu_map(qemu_img, img), 64 * KiB)
    assert e["zero"] and not e["data"], e
    assert e["start"] + e["length"] >= 192 * KiB, e

    # The other way: qemu-io zeroes, strata-io verifies.
    qemu(qemu_io, img, "write -z 1000001 77", "write -z -u 1M 64k")
    assert_reads(strata_io, img, [
        (0xff, 1000000, 1), (0, 1000001, 77), (0xff, 1000078, 10),
        (0, MiB, 64 * KiB), (0xff, MiB + 64 * KiB, 1)])
    assert os.path.getsize(img) == 2 * MiB


def test_discard(tmp_path, strata_io, qemu_io, qemu_img):
    img = make_image(tmp_path / "d.raw", 4 * MiB)
    qemu(qemu_io, img, f"write -P 0xaa 0 {4 * MiB}")
    proc = strata(strata_io, img, f"discard {MiB} {MiB}")
    assert drop_timing(proc.stdout) == [
        f"discard {MiB}/{MiB} bytes at offset {MiB}"]
    # Discarded bytes of a raw file read as zeros (a punched hole) for
    # qemu-io too; the neighbours are untouched.
    assert_reads(qemu_io, img, [(0xaa, 0, MiB), (0, MiB, MiB),
                                (0xaa, 2 * MiB, 2 * MiB)])
    e = extent_at(qemu_map(qemu_img, img), MiB)
    assert not e["data"] and e["start"] == MiB and e["length"] == MiB, e
    assert os.path.getsize(img) == 4 * MiB

    # qemu-io discards, strata-io sees the zeros.
    qemu(qemu_io, img, "discard 3M 64k")
    assert_reads(strata_io, img, [(0xaa, 3 * MiB - 1, 1),
                                  (0, 3 * MiB, 64 * KiB),
                                  (0xaa, 3 * MiB + 64 * KiB, 1)])


def qemu_virtual_size(qemu_img, img):
    out = run(qemu_img, "info", "--output=json", "-f", "raw", img).stdout
    return json.loads(out)["virtual-size"]


def test_truncate(tmp_path, strata_io, qemu_io, qemu_img):
    img = make_image(tmp_path / "t.raw", MiB)
    qemu(qemu_io, img, f"write -P 0x42 0 {MiB}")
    # qemu rounds a raw file's size up to 512 bytes; stay on multiples.
    grown = 3 * MiB + 1536
    proc = strata(strata_io, img, f"truncate {grown}", "length")
    assert drop_timing(proc.stdout) == ["3.001 MiB"]
    assert qemu_virtual_size(qemu_img, img) == grown
    assert_reads(qemu_io, img, [(0x42, 0, MiB), (0, MiB, grown - MiB)])
    # The new tail is writable right up to the new end.
    strata(strata_io, img, f"write -P 0x43 {grown - 1} 1")
    assert_reads(qemu_io, img, [(0x43, grown - 1, 1)])

    strata(strata_io, img, "truncate 1024")
    assert qemu_virtual_size(qemu_img, img) == 1024
    proc = strata(strata_io, img, "length", "read -P 0x42 0 1024",
                  "read 1024 1", check=False)
    assert drop_timing(proc.stdout)[:2] == [
        "1 KiB", "read 1024/1024 bytes at offset 0"]
    assert proc.returncode == 1  # the read past the new end fails
    assert "read failed: Input/output error" in proc.stdout


def test_writes_larger_than_a_chunk(tmp_path, strata_io, qemu_io):
    size = 12 * MiB
    img = make_image(tmp_path / "big.raw", size)
    off, length = MiB + 3, 2 * CHUNK + MiB + 5  # three chunks, unaligned
    proc = strata(strata_io, img, f"write -P 0x5a {off} {length}")
    assert drop_timing(proc.stdout) == [
        f"wrote {length}/{length} bytes at offset {off}"]
    assert_reads(qemu_io, img, [(0, 0, off), (0x5a, off, length),
                                (0, off + length, size - off - length)])

    # A bad byte in the last chunk must fail strata-io's verification.
    qemu(qemu_io, img, f"write -P 0x77 {off + length - 2} 1")
    proc = strata(strata_io, img, f"read -P 0x5a {off} {length}",
                  check=False)
    assert proc.returncode == 1
    assert (f"Pattern verification failed at offset {off}, {length} bytes"
            in proc.stdout)

    # qemu-io writes 10 MiB, strata-io reads it back across chunks.
    qemu(qemu_io, img, f"write -P 0x3c 1 {10 * MiB}")
    assert_reads(strata_io, img, [(0, 0, 1), (0x3c, 1, 10 * MiB),
                                  (0x5a, 10 * MiB + 1, 5)])
    # And strata-io zeroes more than a chunk.
    strata(strata_io, img, f"write -z 7 {9 * MiB}")
    assert_reads(qemu_io, img, [(0x3c, 1, 6), (0, 7, 9 * MiB),
                                (0x3c, 9 * MiB + 7, 10 * MiB - 9 * MiB - 6)])


@pytest.fixture
def seed(request):
    value = int(os.environ.get("STRATA_SEED") or random.randrange(2**32))
    # Shown with the failure, so a failing run can be replayed.
    request.node.user_properties.append(("STRATA_SEED", value))
    print(f"STRATA_SEED={value}")
    return value


def random_ops(rng, size, count):
    ops = []
    for _ in range(count):
        kind = rng.choice(["write", "write", "write", "zero", "unmap",
                           "discard"])
        length = rng.choice([1, 511, 512, 4096, 65536,
                             rng.randrange(1, 300000)])
        off = rng.randrange(0, size - length + 1)
        if rng.random() < 0.3:
            off -= off % 4096  # sometimes aligned
        if kind == "write":
            ops.append(f"write -P {rng.randrange(256):#x} {off} {length}")
        elif kind == "zero":
            ops.append(f"write -z {off} {length}")
        elif kind == "unmap":
            ops.append(f"write -z -u {off} {length}")
        else:
            ops.append(f"discard {off} {length}")
    return ops


def test_random_sequence_matches_qemu(tmp_path, strata_io, qemu_io,
                                      qemu_img, seed):
    rng = random.Random(seed)
    size = 8 * MiB
    base = make_image(tmp_path / "base.raw", size)
    run(qemu_io, "-f", "raw", "-c", f"write -P 0x99 0 {size}", base)
    s_img, q_img = tmp_path / "s.raw", tmp_path / "q.raw"
    shutil.copyfile(base, s_img)
    shutil.copyfile(base, q_img)
    ops = random_ops(rng, size, 60)
    ops.append(f"write -P 0x5 {size - 3 * MiB} {5 * MiB // 2}")  # > chunk
    s = run(strata_io, "-f", "raw", *io_cmds(*ops), s_img, check=False)
    q = run(qemu_io, "-f", "raw", *io_cmds(*ops), q_img, check=False)
    assert s.returncode == q.returncode == 0, (
        f"seed {seed}\n{s.stdout}{s.stderr}")
    assert drop_timing(s.stdout) == drop_timing(q.stdout), f"seed {seed}"
    cmp = run(qemu_img, "compare", "-f", "raw", "-F", "raw", s_img, q_img,
              check=False)
    assert cmp.returncode == 0, (
        f"seed {seed}: images differ\n{cmp.stdout}{cmp.stderr}\n"
        + "\n".join(ops))
    assert os.path.getsize(s_img) == size


# ---- -t none (O_DIRECT) ----

DIRECT_WRITES = [
    (0x11, 1, 1000),
    (0x22, 4095, 2),
    (0x33, 4990, 10),    # the last bytes of a 5000-byte file
    (0x44, 512, 512),    # aligned
    (0x55, 2047, 2100),  # spans blocks, unaligned both ends
]


def test_direct_unaligned_writes(tmp_path, strata_io, qemu_io):
    data = bytearray(random.Random(5000).randbytes(5000))
    img = make_image(tmp_path / "o.raw", data=bytes(data))
    proc = strata(strata_io, img,
                  *[f"write -P {p:#x} {o} {n}" for p, o, n in DIRECT_WRITES],
                  opts=("-f", "raw", "-t", "none"))
    for p, o, n in DIRECT_WRITES:
        apply_write(data, p, o, n)
        assert f"wrote {n}/{n} bytes at offset {o}" in proc.stdout
    # Read-modify-write kept the neighbouring bytes and did not leave the
    # block padding behind: the file is still 5000 bytes.
    assert os.path.getsize(img) == 5000
    assert img.read_bytes() == data
    assert_reads(qemu_io, img, [(0x11, 1, 511), (0x44, 512, 512),
                                (0x55, 2047, 2100), (0x33, 4990, 10)],
                 opts=("-f", "raw", "-r"))
    # strata-io reads unaligned ranges back through O_DIRECT too.
    assert_reads(strata_io, img, [(0x55, 4095, 1), (0x55, 4096, 51),
                                  (0x33, 4999, 1)],
                 opts=("-f", "raw", "-t", "none", "-r"))
    proc = strata(strata_io, img, "read -v 4994 6",
                  opts=("-f", "raw", "-t", "none", "-r"))
    assert drop_timing(proc.stdout)[0] == (
        "00001382:  33 33 33 33 33 33  333333")


def test_direct_zeroes_and_growth(tmp_path, strata_io, qemu_io):
    data = bytearray(random.Random(7).randbytes(9000))
    img = make_image(tmp_path / "z.raw", data=bytes(data))
    strata(strata_io, img, "write -z 3 1000", "write -z -u 8190 810",
           "discard 100 1", opts=("-f", "raw", "-t", "none"))
    data[3:1003] = bytes(1000)
    data[8190:9000] = bytes(810)
    got = img.read_bytes()
    assert len(got) == 9000
    # discard may or may not zero its one byte; everything else is exact.
    assert got[:100] + got[101:] == data[:100] + data[101:]
    assert_reads(qemu_io, img, [(0, 3, 1000), (0, 8190, 810)],
                 opts=("-f", "raw", "-r", "-t", "none"))

    # An empty file grown by strata-io under O_DIRECT: writes inside the
    # new size must not push it to a block multiple.
    empty = make_image(tmp_path / "e.raw", 0)
    proc = strata(strata_io, empty, "truncate 100", "write -P 7 50 10",
                  "write -P 8 99 1", "length",
                  opts=("-f", "raw", "-t", "none"))
    assert drop_timing(proc.stdout)[-1] == "100 bytes"
    assert empty.read_bytes() == bytes(50) + b"\7" * 10 + bytes(39) + b"\10"


# ---- output parity with qemu-io ----

def both(strata_io, qemu_io, tmp_path, cmds, data=None, size=MiB,
         opts=("-f", "raw")):
    """Run CMDS with strata-io and qemu-io on two copies of one image.
    Returns (strata proc, qemu proc, strata image, qemu image)."""
    s_img = make_image(tmp_path / "s.raw", size, data)
    q_img = make_image(tmp_path / "q.raw", size, data)
    s = run(strata_io, *opts, *io_cmds(*cmds), s_img, check=False)
    q = run(qemu_io, *opts, *io_cmds(*cmds), q_img, check=False)
    return s, q, s_img, q_img


REPORT_CMDS = [
    "read 0 512", "read 1 1", "write 4095 2", "write -P 0x61 65536 131072",
    "write -z 7 3", "write -z -u 0 4096", "discard 1000 24",
    "read 0 0", "write -f 2 3", f"read {MiB - 1} 1", f"read 0 {MiB}",
]


def test_report_lines_match_qemu(tmp_path, strata_io, qemu_io):
    s, q, s_img, q_img = both(strata_io, qemu_io, tmp_path, REPORT_CMDS)
    assert s.returncode == q.returncode == 0, s.stdout + s.stderr
    assert drop_timing(s.stdout) == drop_timing(q.stdout)
    # One report line and one timing line per command.
    assert len(s.stdout.splitlines()) == 2 * len(REPORT_CMDS)
    assert drop_timing(s.stdout)[0] == "read 512/512 bytes at offset 0"
    assert s_img.read_bytes() == q_img.read_bytes()


def test_quiet_suppresses_reports(tmp_path, strata_io, qemu_io):
    cmds = ["read -q 0 512", "write -q 1 2", "write -q -z 0 1",
            "discard -q 0 1", "read -q -P 0 0 1"]
    s, q, _, _ = both(strata_io, qemu_io, tmp_path, cmds)
    assert q.stdout == "" and q.returncode == 0  # the oracle agrees
    assert s.stdout == "" and s.stderr == "" and s.returncode == 0


def test_read_verbose_hexdump_matches_qemu(tmp_path, strata_io, qemu_io):
    # Every byte value, so the printable column is exercised fully.
    data = bytes(range(256)) * 4 + b"strata-io 0123 xyz" * 10
    cmds = ["read -v 0 256", "read -v 5 77", "read -v 1000 180",
            "read -v 250 1", "read -v -P 0x41 65 1"]
    s, q, _, _ = both(strata_io, qemu_io, tmp_path, cmds, data=data)
    assert s.returncode == q.returncode == 0
    assert drop_timing(s.stdout) == drop_timing(q.stdout)
    assert "00000000:  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  " \
        "................" in s.stdout
    assert "00000040:  40 41 42 43 44 45 46 47 48 49 4a 4b 4c 4d 4e 4f  " \
        ".ABCDEFGHIJKLMNO" in s.stdout


def test_pattern_failure_lines_match_qemu(tmp_path, strata_io, qemu_io):
    data = b"\x41" * 4096 + b"\x42" * 4096
    cmds = ["read -P 0x41 0 4096", "read -P 0x41 100 5000",
            "read -P 0x42 4096 4096", "read -v -P 0x42 4090 20",
            "read -q -P 0x43 0 1"]
    s, q, _, _ = both(strata_io, qemu_io, tmp_path, cmds, data=data)
    assert q.returncode == 1
    assert s.returncode == 1
    assert drop_timing(s.stdout) == drop_timing(q.stdout)
    assert "Pattern verification failed at offset 100, 5000 bytes" \
        in s.stdout.splitlines()


# Sizes are multiples of 512: qemu rounds a raw file's length up to one.
@pytest.mark.parametrize("size", [0, 512, 5120, MiB, 3 * MiB + 1536,
                                  5 * 1024**3])
def test_length_and_map_match_qemu(tmp_path, strata_io, qemu_io, size):
    s, q, _, _ = both(strata_io, qemu_io, tmp_path, ["length", "map"],
                      size=size, opts=("-f", "raw", "-r"))
    assert s.returncode == q.returncode == 0, s.stdout + s.stderr
    assert s.stdout == q.stdout
    assert s.stdout  # "0 bytes" at least


def test_map_of_sparse_file_matches_qemu(tmp_path, strata_io, qemu_io):
    img = make_image(tmp_path / "sp.raw", 4 * MiB)
    qemu(qemu_io, img, "write -P 1 64k 64k", "write -P 2 3M 4k")
    s = strata(strata_io, img, "map", "length", opts=("-f", "raw", "-r"))
    q = qemu(qemu_io, img, "map", "length", opts=("-f", "raw", "-r"))
    assert s.stdout == q.stdout
    assert s.stdout.splitlines()[-1] == "4 MiB"


EXIT_CASES = {
    "all-ok": ["read 0 1", "write 1 1", "length", "map", "flush"],
    "failure-then-ok": ["read 0 2M", "read 0 1"],
    "ok-then-failure": ["write 0 1", "write 1048575 2"],
    "pattern-mismatch": ["read -P 0x1 0 1"],
    "unknown-command": ["length", "frobnicate"],
    "bad-number": ["read 0 12q"],
    "quit-stops": ["read 0 1", "quit", "read 0 2M"],
}


@pytest.mark.parametrize("name", sorted(EXIT_CASES))
def test_exit_status_matches_qemu(tmp_path, strata_io, qemu_io, name):
    s, q, _, _ = both(strata_io, qemu_io, tmp_path, EXIT_CASES[name])
    assert s.returncode == q.returncode, (
        f"strata {s.returncode}, qemu-io {q.returncode}\n"
        f"{s.stdout}{s.stderr}")
    # The commands that succeeded printed the same reports.
    report = re.compile(r"^(read|wrote) \d+/\d+ bytes at offset \d+$")
    assert ([l for l in s.stdout.splitlines() if report.match(l)]
            == [l for l in q.stdout.splitlines() if report.match(l)])


def test_exit_status_from_stdin_matches_qemu(tmp_path, strata_io, qemu_io):
    for script, want in [("read 0 1\nlength\n", 0),
                         ("read 0 2M\nread 0 1\n", 1)]:
        img = make_image(tmp_path / f"in{want}.raw", MiB)
        s = run(strata_io, "-f", "raw", img, input=script, check=False)
        q = run(qemu_io, "-f", "raw", img, input=script, check=False)
        assert q.returncode == want
        assert s.returncode == want, s.stdout + s.stderr
        assert "read 1/1 bytes at offset 0" in s.stdout


def test_pattern_failure_names_first_differing_byte(tmp_path, strata_io):
    """stdout keeps qemu-io's line (the request's offset); stderr says where
    the first differing byte is and what it holds."""
    img = make_image(tmp_path / "fm.raw", data=b"\0" * 5000 + b"\x07" + b"\0" * 3191)
    proc = strata(strata_io, img, "read -P 0 4096 4096", check=False)
    assert proc.returncode == 1
    assert "Pattern verification failed at offset 4096, 4096 bytes" \
        in proc.stdout.splitlines()
    assert proc.stderr.strip() == (
        "strata-io: first mismatch at offset 5000 (0x1388): "
        "expected 0x00, read 0x07")


def test_write_from_source_file_matches_qemu(tmp_path, strata_io, qemu_io):
    """write -s FILE: FILE's bytes, repeated when it is shorter than the
    request; its errors and the -z/-P/-s exclusion in qemu-io's words."""
    rnd = random.Random(7)
    (tmp_path / "big").write_bytes(bytes(rnd.randrange(256)
                                         for _ in range(70000)))
    (tmp_path / "ab").write_bytes(b"ab")
    (tmp_path / "empty").write_bytes(b"")
    cmds = [f"write -s {tmp_path}/ab 3 5", f"write -s {tmp_path}/big 4k 200k",
            f"write -s {tmp_path}/big 300k 64k"]
    s, q, s_img, q_img = both(strata_io, qemu_io, tmp_path, cmds)
    assert s.returncode == q.returncode == 0, s.stdout + s.stderr
    assert drop_timing(s.stdout) == drop_timing(q.stdout)
    assert s_img.read_bytes() == q_img.read_bytes()
    assert s_img.read_bytes()[3:8] == b"ababa"
    for bad in (f"write -s {tmp_path}/empty 0 4k",
                f"write -s {tmp_path}/missing 0 4k",
                f"write -s {tmp_path} 0 4k",
                f"write -s {tmp_path}/ab -P 1 0 4k",
                "write -z -P 1 0 4k"):
        s, q, s_img, q_img = both(strata_io, qemu_io, tmp_path, [bad])
        assert (s.returncode, s.stdout, s.stderr) == \
            (q.returncode, q.stdout, q.stderr) and q.returncode == 1, bad
        assert s_img.read_bytes() == bytes(MiB)


def test_probed_raw_sector_0_as_qemu(tmp_path, strata_io, qemu_io):
    """A probed raw image refuses a sector 0 that would probe as qcow (the
    qcow2 magic with a version), and takes one QEMU would still read as
    raw (version 0)."""
    for version, ok in ((0, True), (1, False), (3, False)):
        src = tmp_path / "hdr"
        src.write_bytes(b"QFI\xfb" + version.to_bytes(4, "big"))
        s, q, s_img, q_img = both(strata_io, qemu_io, tmp_path,
                                  [f"write -s {src} 0 512"], opts=())
        assert s.returncode == q.returncode == (0 if ok else 1), version
        assert s_img.read_bytes() == q_img.read_bytes()
        assert (s_img.read_bytes()[:4] == b"QFI\xfb") == ok
