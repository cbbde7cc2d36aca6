"""strata-io's alloc, readv, writev, aio_*, sleep, sigraise, abort and
help, and read's -s/-l and -C, against qemu-io 7.2 on copies of the same
raw and qcow2 images.

Each test runs one command list through both tools and asserts the same
stdout, stderr and exit status (timing lines masked) and, where the
commands write, the same resulting image (qemu-img compare).  Two strata
additions are masked too, on purpose: the "(detail)" after an I/O
failure's errno text and the "strata-io: first mismatch ..." line on
stderr after a pattern failure.
"""
import re
import shutil

import pytest

from harness import io_cmds, run

KiB = 1024
MiB = 1024 * 1024

# qemu-io's timing line, including the garbled one its aio_write -z prints
# (an unset start time: "7:02:05.55 (0.020217 bytes/sec and 0.0000
# ops/sec)"), and -C's "bytes,ops,h:mm:ss.cc,bytes/sec,ops/sec" line.
TIMING = re.compile(r"^[0-9.]+ (bytes|[KMGTPE]iB), 1 ops; [0-9:.]+( sec)? "
                    r"\([0-9.]+ (bytes|[KMGTPE]iB)/sec and [0-9.]+ "
                    r"ops/sec\)$")
CSV = re.compile(r"^([0-9]+),1,[0-9]+:[0-9]{2}:[0-9]{2}\.[0-9]{2},"
                 r"[0-9.]+,[0-9.]+$")
DETAIL = re.compile(r"^(\w+ failed: [^(]+?) \(.*\)$")


def norm_stdout(text):
    out = []
    for line in text.splitlines():
        if TIMING.match(line):
            out.append("<timing>")
            continue
        m = CSV.match(line)
        if m:
            out.append(f"<csv {m.group(1)}>")
            continue
        m = DETAIL.match(line)
        out.append(m.group(1) if m else line)
    return out


def norm_stderr(text):
    """TEXT's lines, strata-io's program name as qemu-io's, and its
    "strata-io: no file open" (test_io_bad_input wants the name there)
    as qemu-io's bare line."""
    text = text.replace("strata-io: no file open", "no file open")
    return [re.sub(r"^strata-io: ", "qemu-io: ", line)
            for line in text.splitlines()
            if not line.startswith("strata-io: first mismatch at offset")]


def make_images(qemu_img, qemu_io, tmp_path, fmt):
    """A 4 MiB image of FMT with data in it.  For qcow2, a backing file
    holds 0x01 over the first MiB and the top holds 0x02 over [64k, 128k),
    a zero cluster at 256k and 0x03 over [4000k, 4096k); raw holds the
    same bytes in one file.  Returns the path of the top image."""
    top = tmp_path / f"top.{fmt}"
    if fmt == "qcow2":
        base = tmp_path / "base.qcow2"
        run(qemu_img, "create", "-q", "-f", "qcow2", base, "4M")
        run(qemu_io, "-f", "qcow2", "-c", "write -P 1 0 1M", base)
        run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base.name,
            "-F", "qcow2", top)
    else:
        run(qemu_img, "create", "-q", "-f", "raw", top, "4M")
        run(qemu_io, "-f", "raw", "-c", "write -P 1 0 1M", top)
    run(qemu_io, "-f", fmt, *io_cmds("write -P 2 64k 64k",
                                     "write -z 256k 64k",
                                     "write -P 3 4000k 96k"), top)
    return top


def both(strata_io, qemu_io, tmp_path, top, fmt, cmds, readonly=False):
    """Run CMDS through strata-io and qemu-io on copies of TOP (the
    backing file is shared: neither tool writes to it).  Asserts equal
    output and exit status and returns (strata proc, s image, q image)."""
    s_img = tmp_path / f"s.{fmt}"
    q_img = tmp_path / f"q.{fmt}"
    shutil.copy(top, s_img)
    shutil.copy(top, q_img)
    opts = ["-f", fmt] + (["-r"] if readonly else [])
    s = run(strata_io, *opts, *io_cmds(*cmds), s_img, check=False)
    q = run(qemu_io, *opts, *io_cmds(*cmds), q_img, check=False)
    assert norm_stdout(s.stdout) == norm_stdout(q.stdout), (
        f"cmds {cmds}\nstrata:\n{s.stdout}\nqemu:\n{q.stdout}")
    assert norm_stderr(s.stderr) == norm_stderr(q.stderr), (
        f"strata:\n{s.stderr}\nqemu:\n{q.stderr}")
    assert s.returncode == q.returncode, (s.stderr, q.stderr)
    return s, s_img, q_img


def assert_same_image(qemu_img, fmt, s_img, q_img):
    run(qemu_img, "compare", "-q", "-f", fmt, "-F", fmt, s_img, q_img)


def assert_refused(strata_io, qemu_io, qemu_img, tmp_path, top, fmt, cmds):
    """Each of CMDS alone fails in both tools, with the same output, and
    leaves the image as it was."""
    for cmd in cmds:
        s, s_img, _ = both(strata_io, qemu_io, tmp_path, top, fmt, [cmd])
        assert s.returncode == 1, cmd
        assert_same_image(qemu_img, fmt, s_img, top)


FORMATS = ["raw", "qcow2"]

# ---- alloc ----

ALLOC_CMDS = [
    "alloc 0", "alloc 64k", "alloc 65537 100", "alloc 0 256k",
    "alloc 0 4M", "alloc 5M", "alloc 4M", "alloc 4095k 8k",
    "alloc 256k 64k", "alloc 256k", "alloc 1 1", "alloc 0 0", "alloc 7E",
    "alloc 4000k 4G", "alloc 1000000 3000000", "alloc 10", "alloc 0x10 0x10",
    "alloc 1.5k", "alloc 63k 2k", "alloc 127k 130k",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_alloc_matches_qemu(tmp_path, strata_io, qemu_io, qemu_img, fmt):
    top = make_images(qemu_img, qemu_io, tmp_path, fmt)
    s, _, _ = both(strata_io, qemu_io, tmp_path, top, fmt, ALLOC_CMDS,
                   readonly=True)
    assert s.returncode == 0
    lines = s.stdout.splitlines()
    assert len(lines) == len(ALLOC_CMDS)
    if fmt == "qcow2":
        # Only the top layer counts: the backing file's first MiB does
        # not, the zero cluster at 256k does.
        assert lines[0] == "0/512 bytes allocated at offset 0 bytes"
        assert lines[4] == "262144/4194304 bytes allocated at offset 0 bytes"
        assert lines[8] == ("65536/65536 bytes allocated at offset "
                            "256 KiB")
    else:
        assert lines[4] == ("4194304/4194304 bytes allocated at offset "
                            "0 bytes")
    assert lines[5] == "0/0 bytes allocated at offset 5 MiB"
    assert lines[7] == "1024/1024 bytes allocated at offset 3.999 MiB"


def test_alloc_errors_match_qemu(tmp_path, strata_io, qemu_io, qemu_img):
    top = make_images(qemu_img, qemu_io, tmp_path, "qcow2")
    for cmd in ["alloc", "alloc 1 2 3", "alloc -1", "alloc 0 -1",
                "alloc 0 x", "alloc 0 9E"]:
        s, _, _ = both(strata_io, qemu_io, tmp_path, top, "qcow2", [cmd],
                       readonly=True)
        assert s.returncode == 1, cmd


# ---- readv, writev ----

READV_CMDS = [
    "readv 64k 4k 4k", "readv -P 2 64k 4k 4k", "readv -P 2 60k 4k 4k",
    "readv -q 0 512", "readv -v 64k 16 16", "readv 0 0", "readv 0 0 0",
    "readv -P 1 1 1000 24 3", "readv -C 0 512", "readv 0 1M 1M 1M 1M",
]
READV_BAD = [
    "readv 0", "readv", "readv 0 x", "readv 0 3G", "readv 0 1G 1G 1G",
    "readv 5M 512", "readv -P 300 0 1", "readv -x 0 1",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_readv_matches_qemu(tmp_path, strata_io, qemu_io, qemu_img, fmt):
    top = make_images(qemu_img, qemu_io, tmp_path, fmt)
    s, _, _ = both(strata_io, qemu_io, tmp_path, top, fmt, READV_CMDS,
                   readonly=True)
    assert s.returncode == 1  # the one pattern failure
    assert "read 8192/8192 bytes at offset 65536" in s.stdout
    assert "Pattern verification failed at offset 61440, 8192 bytes" \
        in s.stdout
    for cmd in READV_BAD:
        s, _, _ = both(strata_io, qemu_io, tmp_path, top, fmt, [cmd],
                       readonly=True)
        assert s.returncode == 1, cmd


WRITEV_CMDS = [
    "writev 0 512 512", "writev -P 5 -f 1k 1k 1k", "writev -q 5000 3 7",
    "writev -P 0x66 63k 1k 1k 511", "writev -C 1M 4k", "writev 8k 0",
    "readv -P 0x66 63k 2559",
]
WRITEV_BAD = [
    "writev -z 0 512", "writev 4095k 2k", "writev 0 3G", "writev 0",
    "writev -P x 0 1",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_writev_matches_qemu(tmp_path, strata_io, qemu_io, qemu_img, fmt):
    top = make_images(qemu_img, qemu_io, tmp_path, fmt)
    s, s_img, q_img = both(strata_io, qemu_io, tmp_path, top, fmt,
                           WRITEV_CMDS)
    assert s.returncode == 0
    assert "wrote 2048/2048 bytes at offset 1024" in s.stdout
    assert_same_image(qemu_img, fmt, s_img, q_img)
    assert_refused(strata_io, qemu_io, qemu_img, tmp_path, top, fmt,
                   WRITEV_BAD)


# ---- aio_read, aio_write, aio_flush ----

AIO_CMDS = [
    "aio_read 64k 4k 4k", "aio_read -P 2 64k 4k 4k", "aio_read -P 2 60k 4k",
    "aio_read -q 0 512", "aio_read -v 64k 16 16", "aio_read -i 0 512",
    "aio_read 5M 512", "aio_read -C 0 512",
    "aio_write 0 512", "aio_write -z 100k 512", "aio_write -zu 192k 64k",
    "aio_write -z -P 3 300k 5", "aio_write -f -P 7 2M 1k 1k",
    "aio_write -i 0 512", "aio_write 5M 512", "aio_write -q 9 9",
    "aio_write -C 3M 1", "aio_flush", "read -P 7 2M 2k",
]
AIO_BAD = [
    "aio_read 0", "aio_read 0 3G", "aio_read -x 0 1",
    "aio_write -z 0 512 512", "aio_write -u 0 512", "aio_write -x 0 1",
    "aio_write 0 1G 1G 1G", "aio_flush x",
]


def with_flushes(cmds):
    """CMDS with an aio_flush after each: qemu-io prints a request's
    completion when the main loop next runs its callback (at aio_flush or
    at exit, several in an order of its own); strata-io runs each request
    to completion at once, which is the same output once each request is
    waited for."""
    return [c for cmd in cmds for c in (cmd, "aio_flush")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_aio_matches_qemu(tmp_path, strata_io, qemu_io, qemu_img, fmt):
    top = make_images(qemu_img, qemu_io, tmp_path, fmt)
    s, s_img, q_img = both(strata_io, qemu_io, tmp_path, top, fmt,
                           with_flushes(AIO_CMDS))
    # A submitted aio request succeeds whatever happens to it: the
    # pattern failure and both I/O errors leave the exit status 0.
    assert s.returncode == 0
    assert "Pattern verification failed at offset 61440, 4096 bytes" \
        in s.stdout
    assert "injecting invalid read request" in s.stdout
    assert "aio_write failed: Input/output error" in s.stdout
    assert_same_image(qemu_img, fmt, s_img, q_img)
    assert_refused(strata_io, qemu_io, qemu_img, tmp_path, top, fmt,
                   AIO_BAD)


# ---- read -s/-l, -C on read, write and discard ----

READ_CMDS = [
    "read -P 2 -s 0 -l 4k 64k 8k", "read -P 2 -s 4k -l 8k 60k 12k",
    "read -P 2 -s 8k 64k 8k", "read -P 2 -l 100 64k 8k",
    "read -P 2 -s 4k 60k 8k", "read -P 2 -l 0 60k 8k",
    "read -P 2 -s 0 -l 0 0 0", "read -p 0 1", "read -C 0 512",
    "read -C -q 0 512", "write -C 1M 1", "write -C -q 1M 1",
    "discard -C 0 64k", "discard -Cq 64k 64k",
]
READ_BAD = [
    "read -P 2 -s 8k -l 8k 64k 8k", "read -P 2 -s 0 -l 8k 60k 8k",
    "read -P 2 -s 2k -l 4k 60k 8k", "read -s 0 -l 4k 64k 8k",
    "read -l 5 64k 8k", "read -P 2 -l 9k 64k 8k", "read -P 2 -s x 64k 8k",
    "read -P 2 -s 9E 0 8", "read -P 2 -s 9k 64k 8k",
    "read -v -P 2 -s 0 -l 8k 60k 32", "write -n 0 1",
    # Too few words once the options are taken: the usage line.
    "read -q 0", "write -q 0", "discard -q 0", "readv -q 0",
    "writev -q 0", "aio_read -q 0", "aio_write -q 0", "read 0 1 2",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_range_and_csv_match_qemu(tmp_path, strata_io, qemu_io,
                                       qemu_img, fmt):
    top = make_images(qemu_img, qemu_io, tmp_path, fmt)
    s, s_img, q_img = both(strata_io, qemu_io, tmp_path, top, fmt, READ_CMDS)
    assert s.returncode == 0
    assert "<csv 512>" in norm_stdout(s.stdout)
    assert_same_image(qemu_img, fmt, s_img, q_img)
    for cmd in READ_BAD:
        s, _, _ = both(strata_io, qemu_io, tmp_path, top, fmt, [cmd])
        assert s.returncode == 1, cmd


# ---- sleep, sigraise, abort, help ----

def test_sleep_and_sigraise_match_qemu(tmp_path, strata_io, qemu_io,
                                       qemu_img):
    top = make_images(qemu_img, qemu_io, tmp_path, "raw")
    # qemu-io holds SIGBUS, SIGUSR1, SIGALRM, SIGIO blocked and SIGPIPE
    # ignored: raising them changes nothing.
    for cmd in ["sleep 10", "sleep 0x10", "sigraise 0", "sigraise 65",
                "sigraise 7", "sigraise 10", "sigraise 13", "sigraise 14",
                "sigraise 29", "sigraise 17"]:
        s, _, _ = both(strata_io, qemu_io, tmp_path, top, "raw",
                       [cmd, "read 0 1"], readonly=True)
        assert s.returncode == 0, cmd
    for cmd in ["sleep", "sleep x", "sleep 1k", "sleep -5", "sleep 1.5",
                "sleep 10 20", "sigraise", "sigraise x", "sigraise -1",
                "sigraise 1k", "sigraise 100", "abort x"]:
        s, _, _ = both(strata_io, qemu_io, tmp_path, top, "raw",
                       [cmd, "read 0 1"], readonly=True)
        assert s.returncode == 1, cmd
        assert "read 1/1 bytes at offset 0" in s.stdout


@pytest.mark.parametrize("cmd,status", [("sigraise 15", -15),
                                        ("sigraise 9", -9),
                                        ("sigraise 12", -12),
                                        ("abort", -6)])
def test_signals_end_the_program_as_qemu(tmp_path, strata_io, qemu_io,
                                         qemu_img, cmd, status):
    top = make_images(qemu_img, qemu_io, tmp_path, "raw")
    for tool in (strata_io, qemu_io):
        p = run(tool, "-f", "raw", "-r", *io_cmds(cmd, "read 0 1"), top,
                check=False)
        assert p.returncode == status, (tool, p.stderr)
        assert "read 1/1" not in p.stdout


# qemu-io commands strata-io does not have (blkdebug breakpoints); reopen
# is there without qemu-io's -c/-o options, so its usage differs.
MISSING = {"break", "remove_break", "resume", "wait_break"}
SUBSET = {"reopen"}


def test_help_lists_qemu_commands(tmp_path, strata_io, qemu_io, qemu_img):
    top = make_images(qemu_img, qemu_io, tmp_path, "raw")
    q = run(qemu_io, "-f", "raw", "-r", "-c", "help", top)
    s = run(strata_io, "-f", "raw", "-r", "-c", "help", top)
    q_lines = [line for line in q.stdout.splitlines()
               if not line or line.split()[0] not in MISSING]
    s_lines = s.stdout.splitlines()
    assert [line.split(" ")[0] for line in s_lines] == \
        [line.split(" ")[0] for line in q_lines]
    for s_line, q_line in zip(s_lines, q_lines):
        if not s_line or s_line.split()[0] not in SUBSET:
            assert s_line == q_line
    for name in ["alloc", "aio_write", "readv", "writev", "sleep"]:
        one = run(strata_io, "-f", "raw", "-r", "-c", f"help {name}", top)
        assert one.stdout.splitlines()[0] in q_lines
    both(strata_io, qemu_io, tmp_path, top, "raw", ["help foo"],
         readonly=True)


# ---- open, close ----

def run_in_dirs(strata_io, qemu_io, qemu_img, tmp_path, top, fmt, cmds,
                with_file):
    """Like both(), but the commands may name the image (open img.FMT):
    each tool runs in a directory of its own that holds its copy under
    the same name, so both outputs name the same file."""
    procs = []
    for tool, name in ((strata_io, "s"), (qemu_io, "q")):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(top, d / f"img.{fmt}")
        if fmt == "qcow2":
            shutil.copy(tmp_path / "base.qcow2", d / "base.qcow2")
        args = ["-f", fmt, *io_cmds(*cmds), f"img.{fmt}"] if with_file \
            else io_cmds(*cmds)
        procs.append(run(tool, *args, cwd=d, check=False))
    s, q = procs
    assert norm_stdout(s.stdout) == norm_stdout(q.stdout), (
        f"cmds {cmds}\nstrata:\n{s.stdout}\nqemu:\n{q.stdout}")
    assert norm_stderr(s.stderr) == norm_stderr(q.stderr), (
        f"strata:\n{s.stderr}\nqemu:\n{q.stderr}")
    assert s.returncode == q.returncode, (s.stderr, q.stderr)
    assert_same_image(qemu_img, fmt, tmp_path / "s" / f"img.{fmt}",
                      tmp_path / "q" / f"img.{fmt}")
    return s


OPEN_CMDS = {
    "close-then-open": (True, [
        "close", "read 0 1", "close", "open {img}", "write -P 9 0 1k",
        "read -P 9 0 1k", "open {img}", "close", "open -r {img}",
        "read -P 9 0 1k", "close", "open -U -r {img}", "alloc 0 64k"]),
    "no-file": (False, [
        "sleep 1", "sigraise 0", "help alloc", "info", "map", "flush",
        "aio_flush", "alloc 0", "close", "read 0 1", "open", "open -x",
        "open a b", "open nonexist", "length", "open -r", "open -t bogus {img}",
        "open -U {img}", "open -n {img}", "write 1 1", "read -P 0xcd 1 1",
        "length", "open {img}"]),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(OPEN_CMDS))
def test_open_close_match_qemu(tmp_path, strata_io, qemu_io, qemu_img, fmt,
                               case):
    top = make_images(qemu_img, qemu_io, tmp_path, fmt)
    with_file, cmds = OPEN_CMDS[case]
    opts = f"-o driver={fmt} " if fmt == "raw" else ""
    cmds = [c.replace("{img}", f"{opts}img.{fmt}") for c in cmds]
    s = run_in_dirs(strata_io, qemu_io, qemu_img, tmp_path, top, fmt, cmds,
                    with_file)
    assert s.returncode == 1
    assert "no file open, try 'help open'" in s.stderr
    assert "file open already, try 'help close'" in s.stderr
    assert ("wrote 1024/1024 bytes at offset 0" if with_file
            else "read 1/1 bytes at offset 1") in s.stdout


# ---- writes on a read-only image ----

RO_CMDS = ["write 0 1", "writev 0 1", "aio_write 0 1", "write -z 0 1",
           "discard 0 1", "truncate 1M", "read 0 1", "alloc 0"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_writes_refused_on_read_only_image_as_qemu(tmp_path, strata_io,
                                                   qemu_io, qemu_img, fmt):
    top = make_images(qemu_img, qemu_io, tmp_path, fmt)
    s, s_img, _ = both(strata_io, qemu_io, tmp_path, top, fmt, RO_CMDS,
                       readonly=True)
    assert s.returncode == 1
    assert s.stderr.count("strata-io: Block node is read-only") == 6
    assert "read 1/1 bytes at offset 0" in s.stdout
    assert_same_image(qemu_img, fmt, s_img, top)
    # open -r and reopen -w: the same check follows the image's mode.
    cmds = ["close", "open -r {img}", "write 0 1", "reopen -w",
            "write -P 4 0 1", "reopen -r", "discard 0 1", "read -P 4 0 1"]
    opts = f"-o driver={fmt} " if fmt == "raw" else ""
    cmds = [c.replace("{img}", f"{opts}img.{fmt}") for c in cmds]
    s = run_in_dirs(strata_io, qemu_io, qemu_img, tmp_path, top, fmt, cmds,
                    True)
    assert s.stderr.count("Block node is read-only") == 2
    assert "wrote 1/1 bytes at offset 0" in s.stdout


# ---- truncate -m ----

@pytest.mark.parametrize("fmt", FORMATS)
def test_truncate_prealloc_off_as_qemu(tmp_path, strata_io, qemu_io,
                                       qemu_img, fmt):
    top = make_images(qemu_img, qemu_io, tmp_path, fmt)
    cmds = ["truncate -m off 6M", "length", "truncate -m bogus 7M",
            "truncate -x 1M", "truncate -m", "length", "alloc 5M 1M"]
    s, s_img, q_img = both(strata_io, qemu_io, tmp_path, top, fmt, cmds)
    assert s.returncode == 1
    assert s.stdout.splitlines()[0] == "6 MiB"
    assert "Invalid preallocation mode 'bogus'" in s.stderr
    assert_same_image(qemu_img, fmt, s_img, q_img)
