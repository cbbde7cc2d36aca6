"""strata-img stream: pull a backing chain into an image offline.

The guest view must not change (qemu-img compare with the chain's content
saved as raw before), layers at and below BASE must not be touched
(sha256), the header must name BASE afterwards (qemu-img info), and
qemu-img check must find nothing.  A stream killed with kill -9 must
leave an image that reads the same and completes when run again.
"""
import json
import os
import signal
import subprocess
import time

from harness import assert_progress_bar, binary, file_state, run, spawn
from harness.qcow2 import KiB, MiB, create, qemu_check, qemu_img, qio


def img(*args, check=True):
    return run(binary("strata-img"), *args, check=check)


def info(path):
    return json.loads(run(qemu_img(), "info", "--output=json",
                          path).stdout)


def depths(path):
    """{start: depth or None} for each extent of qemu-img map."""
    p = run(qemu_img(), "map", "--output=json", path)
    return {e["start"]: (e["depth"] if e["present"] else None, e["zero"])
            for e in json.loads(p.stdout)}


def make_chain(d):
    """A <- B <- C in directory D, each layer with its own data, B with a
    zero cluster over A's data; returns the paths and C's content."""
    a, b, c = d / "A.qcow2", d / "B.qcow2", d / "C.qcow2"
    create(a, 8 * MiB)
    qio(a, ["write -q -P 1 0 1M", "write -q -P 2 4M 1M"])
    create(b, 8 * MiB, backing="A.qcow2")
    qio(b, ["write -q -P 3 512k 1M", "write -q -z 4M 256k"])
    create(c, 8 * MiB, backing="B.qcow2")
    qio(c, ["write -q -P 5 7M 64k"])
    raw = d / "orig.raw"
    run(qemu_img(), "convert", "-O", "raw", c, raw)
    return a, b, c, raw


def test_intermediate_stream_to_base(tmp_path):
    a, b, c, raw = make_chain(tmp_path)
    a_before, b_before = file_state(a), file_state(b)
    p = img("stream", "-p", "-b", a, c)
    assert p.stdout == "Image streamed.\n"  # no progress off a terminal
    assert file_state(a) == a_before and file_state(b) == b_before
    i = info(c)
    assert i["backing-filename"] == "A.qcow2"
    assert i["backing-filename-format"] == "qcow2"
    run(qemu_img(), "compare", "-F", "raw", c, raw)
    qemu_check(c)
    m = depths(c)
    # B's data and B's zero cluster over A's data are now in C.
    assert m[512 * KiB] == (0, False)
    assert m[4 * MiB] == (0, True)
    # A's own data stays in A.
    assert m[0] == (1, False)


def test_full_stream_removes_backing(tmp_path):
    a, b, c, raw = make_chain(tmp_path)
    img("stream", "-q", c)
    assert "backing-filename" not in info(c)
    run(qemu_img(), "compare", "-F", "raw", c, raw)
    qemu_check(c)
    assert all(d == 0 for d, z in depths(c).values() if d is not None)


def test_base_named_by_another_path(tmp_path):
    """C in one directory, A and B in another: a relative name from B's
    header would be wrong from C's directory, so the absolute path goes
    into C's header."""
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    a, b = d2 / "A.qcow2", d2 / "B.qcow2"
    create(a, MiB)
    qio(a, ["write -q -P 7 0 64k"])
    create(b, MiB, backing="A.qcow2")
    qio(b, ["write -q -P 8 64k 64k"])
    c = d1 / "C.qcow2"
    create(c, MiB, backing="../d2/B.qcow2")
    raw = tmp_path / "orig.raw"
    run(qemu_img(), "convert", "-O", "raw", c, raw)
    img("stream", "-b", str(a), c)
    assert info(c)["backing-filename"] == str(a.resolve())
    run(qemu_img(), "compare", "-F", "raw", c, raw)


def test_errors_change_nothing(tmp_path):
    a, b, c, raw = make_chain(tmp_path)
    before = [file_state(x) for x in (a, b, c)]
    p = img("stream", a, check=False)
    assert p.returncode == 1
    assert p.stderr == f"strata-img: '{a}' does not have a backing file\n"
    p = img("stream", "-b", tmp_path / "nothere.qcow2", c, check=False)
    assert p.returncode == 1
    assert p.stderr == (f"strata-img: Did not find '{tmp_path}/nothere.qcow2'"
                        f" in the backing chain of '{c}'\n")
    p = img("stream", "-r", "fast", c, check=False)
    assert p.returncode == 1 and "Invalid rate limit" in p.stderr
    p = img("stream", "-b", c, c, check=False)
    assert p.returncode == 1 and "Did not find" in p.stderr
    p = img("stream", "-t", "sometimes", c, check=False)
    assert p.returncode == 1
    assert p.stderr == "strata-img: Invalid cache option: sometimes\n"
    p = img("stream", check=False)
    assert p.returncode == 1
    assert p.stderr.startswith("strata-img: Expecting one image file name\n")
    p = img("stream", tmp_path / "missing.qcow2", check=False)
    assert p.returncode == 1
    assert p.stderr.startswith(
        f"strata-img: Could not open '{tmp_path}/missing.qcow2'")
    assert [file_state(x) for x in (a, b, c)] == before


def test_base_is_direct_backing_is_a_no_op(tmp_path):
    a, b, c, raw = make_chain(tmp_path)
    before = file_state(c)
    p = run(binary("strata-img"), "stream", "-b", "B.qcow2", "C.qcow2",
            cwd=tmp_path)
    assert p.returncode == 0
    assert file_state(c) == before


def test_kill_mid_stream_then_rerun(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    size = 32 * MiB
    create(base, size)
    qio(base, [f"write -q -P 0x5a 0 {size // 2}",
               f"write -q -P 0x6b {size // 2 + 64 * KiB} 4M"])
    create(top, size, backing="base.qcow2")
    qio(top, ["write -q -P 0x7c 8M 64k"])
    raw = tmp_path / "orig.raw"
    run(qemu_img(), "convert", "-O", "raw", top, raw)
    proc = spawn([binary("strata-img"), "stream", "-r", "8M",
                             str(top)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    time.sleep(1.5)
    assert proc.poll() is None, "stream ended before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Killed: still on the old chain, part of it copied, same content.
    assert info(top)["backing-filename"] == "base.qcow2"
    copied = [s for s, (d, z) in depths(top).items() if d == 0]
    assert copied and copied != [8 * MiB]
    run(qemu_img(), "compare", "-F", "raw", top, raw)
    p = run(qemu_img(), "check", top, check=False)
    assert p.returncode in (0, 3), p.stdout  # leaked clusters at worst
    img("stream", top)
    assert "backing-filename" not in info(top)
    run(qemu_img(), "compare", "-F", "raw", top, raw)
    p = run(qemu_img(), "check", top, check=False)
    assert p.returncode in (0, 3) and "ERROR" not in p.stdout, p.stdout


def test_short_intermediate_layer_keeps_zeros(tmp_path):
    """C reads zeros past the end of a short B; with A (longer, all data)
    as the new backing file those zeros must be in C."""
    a, b, c = (tmp_path / n for n in ("A.qcow2", "B.qcow2", "C.qcow2"))
    create(a, 2 * MiB)
    qio(a, ["write -q -P 9 0 2M"])
    create(b, MiB, backing="A.qcow2")
    create(c, 2 * MiB, backing="B.qcow2")
    raw = tmp_path / "orig.raw"
    run(qemu_img(), "convert", "-O", "raw", c, raw)
    img("stream", "-b", a, c)
    run(qemu_img(), "compare", "-F", "raw", c, raw)
    assert depths(c)[MiB] == (0, True)
    qemu_check(c)


def test_progress_on_a_terminal(tmp_path):
    import pty
    a, b, c, raw = make_chain(tmp_path)
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(binary("strata-img"), ["strata-img", "stream", "-p",
                                        str(c)])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    text = out.decode()
    assert_progress_bar(text)
    assert text.endswith("Image streamed.\r\n")
