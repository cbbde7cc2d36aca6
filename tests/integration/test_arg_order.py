"""Argument order: strata's tools take their options and operands in the
orders QEMU's tools 7.2 take them.

qemu-io, qemu-img's subcommands and qemu-nbd parse their command lines
with glibc's getopt, which moves options found after the operands to the
front (QEMU's own image fuzzer runs `qemu-io IMAGE -c CMD`).  Each test runs
the QEMU tool and ours on copies of the same image with the same argument
list, once in the usual order and once permuted, and asserts that the
exit status agrees and that the permuted run prints what the usual order
prints.  With POSIXLY_CORRECT set, getopt stops at the first operand in
both, and so do the refusals.
"""
import json
import os
import shutil
import subprocess

import pytest

from harness import binary, drop_timing, need, procs, run

MiB = 1 << 20


@pytest.fixture
def images(tmp_path):
    """a.qcow2 (8 MiB, pattern 0x11 at 0..1M) and b.raw, for each tool
    its own copy in tmp_path/<tool>/."""
    qemu_img = need("qemu-img", "qemu-utils")
    qemu_io = need("qemu-io", "qemu-utils")
    t = tmp_path / "template"
    t.mkdir()
    run(qemu_img, "create", "-q", "-f", "qcow2", t / "a.qcow2", str(8 * MiB))
    run(qemu_io, "-f", "qcow2", "-c", "write -P 0x11 0 1M", t / "a.qcow2")
    run(qemu_img, "convert", "-f", "qcow2", "-O", "raw", t / "a.qcow2",
        t / "b.raw")

    def copy(tool):
        d = tmp_path / tool
        if not d.exists():
            shutil.copytree(t, d)
        return d
    return copy


def both(name):
    """(QEMU's tool, ours) for qemu-NAME / strata-NAME."""
    return [need("qemu-" + name, "qemu-utils"), binary("strata-" + name)]


def outcome(argv, cwd, env=None):
    p = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True,
                       text=True, timeout=120, env=env)
    assert "Sanitizer" not in p.stderr, p.stderr
    return p.returncode, drop_timing(p.stdout)


# ---- strata-io -------------------------------------------------------------

# (usual order, permuted): the same words, options after the operands.
IO_ORDERS = [
    (["-f", "qcow2", "-c", "read -P 0x11 0 64k", "a.qcow2"],
     ["a.qcow2", "-c", "read -P 0x11 0 64k", "-f", "qcow2"]),
    (["-r", "-c", "read -v 0 32", "a.qcow2"],
     ["a.qcow2", "-r", "-c", "read -v 0 32"]),
    (["-c", "write -P 0x22 64k 4k", "-c", "read -P 0x22 64k 4k", "a.qcow2"],
     ["-c", "write -P 0x22 64k 4k", "a.qcow2", "-c", "read -P 0x22 64k 4k"]),
    (["-c", "write -q -P 0x33 1M 512", "-c", "read -v 1M 16", "a.qcow2"],
     ["a.qcow2", "-c", "write -q -P 0x33 1M 512", "-c", "read -v 1M 16"]),
    (["-f", "raw", "-c", "writev -q -P 0x44 0 512 512",
      "-c", "readv -P 0x44 0 1k", "b.raw"],
     ["-c", "writev -q -P 0x44 0 512 512", "b.raw", "-f", "raw",
      "-c", "readv -P 0x44 0 1k"]),
    (["-c", "read -P 0x11 0 512", "a.qcow2"],
     ["-c", "read -P 0x11 0 512", "--", "a.qcow2"]),
]


@pytest.mark.parametrize("usual,permuted", IO_ORDERS,
                         ids=[" ".join(p)[:40] for _, p in IO_ORDERS])
def test_io_permuted_arguments(images, usual, permuted):
    results = []
    for tool in both("io"):
        d = images(os.path.basename(tool))
        first = outcome([tool, *usual], d)
        shutil.rmtree(d)
        d = images(os.path.basename(tool))
        second = outcome([tool, *permuted], d)
        assert first[0] == 0, (tool, usual, first)
        assert second == first, (tool, permuted)
        results.append(second)
    assert results[0] == results[1]


IO_REFUSED = [
    ["a.qcow2", "b.raw", "-c", "read 0 512"],       # two images
    ["--", "a.qcow2", "-c", "read 0 512"],          # operands after --
    ["-c", "open a.qcow2 -f qcow2"],                # open has no -f
    ["-c", "read -Z 0 512", "a.qcow2"],             # a bad command option
    ["a.qcow2", "-Z"],                               # a bad option
]


@pytest.mark.parametrize("argv", IO_REFUSED, ids=" ".join)
def test_io_refusals_agree(images, argv):
    got = [outcome([tool, *argv], images(os.path.basename(tool)))[0]
           for tool in both("io")]
    assert got[0] == got[1], got


def test_io_posixly_correct(images):
    """With POSIXLY_CORRECT getopt stops at the image name: `-c CMD` after
    it are operands, which both tools refuse."""
    env = dict(os.environ, POSIXLY_CORRECT="1")
    got = [outcome([tool, "a.qcow2", "-c", "read 0 512"],
                   images(os.path.basename(tool)), env)[0]
           for tool in both("io")]
    assert got[0] == got[1] != 0, got


# ---- strata-img --------------------------------------------------------------

IMG_ORDERS = [
    (["info", "--output=json", "a.qcow2"],
     ["info", "a.qcow2", "--output=json"]),
    (["info", "-f", "qcow2", "a.qcow2"], ["info", "a.qcow2", "-f", "qcow2"]),
    (["map", "--output=json", "-f", "qcow2", "a.qcow2"],
     ["map", "a.qcow2", "--output=json", "-f", "qcow2"]),
    (["check", "--output=json", "a.qcow2"],
     ["check", "a.qcow2", "--output=json"]),
    (["compare", "-f", "qcow2", "-F", "raw", "a.qcow2", "b.raw"],
     ["compare", "a.qcow2", "b.raw", "-f", "qcow2", "-F", "raw"]),
    (["create", "-q", "-f", "qcow2", "c.qcow2", "1M"],
     ["create", "c.qcow2", "1M", "-f", "qcow2", "-q"]),
    (["convert", "-f", "qcow2", "-O", "raw", "a.qcow2", "c.raw"],
     ["convert", "a.qcow2", "c.raw", "-f", "qcow2", "-O", "raw"]),
    (["measure", "--output=json", "-O", "qcow2", "a.qcow2"],
     ["measure", "a.qcow2", "--output=json", "-O", "qcow2"]),
    (["snapshot", "-l", "a.qcow2"], ["snapshot", "a.qcow2", "-l"]),
    (["resize", "-f", "raw", "-q", "b.raw", "+1M"],
     ["resize", "-f", "raw", "b.raw", "-q", "+1M"]),
]


@pytest.mark.parametrize("usual,permuted", IMG_ORDERS,
                         ids=[" ".join(p)[:40] for _, p in IMG_ORDERS])
def test_img_permuted_arguments(images, usual, permuted):
    statuses = []
    for tool in both("img"):
        d = images(os.path.basename(tool))
        first = outcome([tool, *usual], d)
        shutil.rmtree(d)
        d = images(os.path.basename(tool))
        second = outcome([tool, *permuted], d)
        assert first[0] == 0, (tool, usual, first)
        assert second == first, (tool, permuted)
        statuses.append(second[0])
    assert statuses[0] == statuses[1]


# qemu-img resize takes no option after its size (a size may be "-1G"):
# both refuse it, with the same message.
IMG_REFUSED = [
    ["resize", "b.raw", "16M", "-q"],
]


@pytest.mark.parametrize("argv", IMG_REFUSED, ids=" ".join)
def test_img_refusals_agree(images, argv):
    got = []
    for tool in both("img"):
        p = subprocess.run([tool, *argv], cwd=images(os.path.basename(tool)),
                           capture_output=True, text=True, timeout=120)
        got.append((p.returncode, p.stdout,
                    p.stderr.replace(os.path.basename(tool), "PROG")))
    assert got[0] == got[1], got
    assert got[0][0] != 0


# ---- strata-nbd --------------------------------------------------------------

def serve(prog, argv, d):
    """Start PROG ARGV in D; wait for its socket d/s; the process."""
    proc = procs.spawn([prog, *argv], cwd=d, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    procs.wait_for_path(d / "s", proc, timeout=30)
    return proc


NBD_ORDERS = [
    ["a.qcow2", "-r", "-t", "--socket", "{d}/s", "-f", "qcow2"],
    ["-r", "a.qcow2", "-k", "{d}/s", "-t", "--format=qcow2", "-x", "e"],
    ["--read-only", "--persistent", "-k", "{d}/s", "a.qcow2", "-f", "qcow2"],
]


@pytest.mark.parametrize("argv", NBD_ORDERS, ids=" ".join)
def test_nbd_permuted_arguments(images, argv):
    """The image named anywhere among the options: both serve it, read-only
    (-r) under the export name given (-x), and stay up after a client (-t)."""
    nbdinfo = need("nbdinfo", "libnbd-bin")
    seen = []
    for prog in both("nbd"):
        d = images(os.path.basename(prog))
        proc = serve(prog, [a.replace("{d}", str(d)) for a in argv], d)
        try:
            name = "e" if "-x" in argv else ""
            uri = f"nbd+unix:///{name}?socket={d / 's'}"
            info = [json.loads(run(nbdinfo, "--json", uri).stdout)
                    for _ in range(2)]
            assert proc.poll() is None, f"{prog} exited after a client"
            exp = info[1]["exports"][0]
            seen.append((exp["export-size"], exp["is_read_only"],
                         exp["export-name"]))
        finally:
            procs.stop(proc)
    assert seen[0] == seen[1] == (8 * MiB, True, seen[0][2]), seen
