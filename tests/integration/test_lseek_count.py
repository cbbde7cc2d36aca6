"""How many lseek(SEEK_DATA/SEEK_HOLE) calls strata-img map and convert
make: the guard on their complexity, counted, not timed.

On tmpfs an lseek walks the page cache from its offset onwards, so a tool
that asks the file about every extent of a chain takes time growing with
the square of the image (issue 20: minutes for a 4 GiB chain).  A qcow2
chain answers block status from its own metadata, so the number of lseeks
must not grow with the number of extents: the same two chains, one with a
few scattered clusters in each overlay and one with many, must cost the
same count.  A metadata-preallocated image is asked about (as QEMU asks),
but each run of data in the file is walked once, not once per extent.

The counts come from strace (-f, every thread).
"""
import os
import random

import pytest

from harness import binary, need, run

MiB = 1 << 20
CLUSTER = 64 << 10


def qemu_img():
    return need("qemu-img", "qemu-utils")


def qemu_io(d, img, cmds):
    run(need("qemu-io", "qemu-utils"), "-f", "qcow2", img,
        input="\n".join(cmds) + "\n", cwd=d)


def make_chain(d, picks, size=64 * MiB, seed=1):
    """base <- mid <- top, the shape of bench/fixture.sh: a written base
    and two overlays holding PICKS scattered 64 KiB clusters each."""
    d.mkdir()
    run(qemu_img(), "create", "-q", "-f", "qcow2", "base.qcow2", str(size),
        cwd=d)
    qemu_io(d, "base.qcow2", [f"write -P 1 0 {size}"])
    rng = random.Random(seed)
    for layer, (name, below) in enumerate([("mid.qcow2", "base.qcow2"),
                                           ("top.qcow2", "mid.qcow2")]):
        run(qemu_img(), "create", "-q", "-f", "qcow2", "-b", below, "-F",
            "qcow2", name, cwd=d)
        clusters = sorted(rng.sample(range(size // CLUSTER), picks))
        qemu_io(d, name, [f"write -P {layer + 2} {c * CLUSTER} {CLUSTER}"
                          for c in clusters])
    return d / "top.qcow2"


def lseeks(d, *args):
    """The lseek calls of strata-img ARGS (run in D), and its stdout."""
    trace = d / "lseek.trace"
    # LeakSanitizer cannot run under ptrace (it aborts the process): in an
    # ASan build, the traced run leaves leak checking to the other tests.
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = ":".join(
        filter(None, [env.get("ASAN_OPTIONS"), "detect_leaks=0"]))
    p = run(need("strace", "strace"), "-f", "-qq", "-e", "trace=lseek",
            "-o", trace, binary("strata-img"), *args, cwd=d, env=env)
    calls = [line for line in trace.read_text().splitlines()
             if "lseek(" in line]
    return calls, p.stdout


def map_extents(out):
    return [line for line in out.splitlines() if '"start"' in line]


@pytest.fixture
def chains(tmp_path):
    few = make_chain(tmp_path / "few", picks=8)
    many = make_chain(tmp_path / "many", picks=400)
    return few, many


def test_map_lseeks_do_not_grow_with_extents(chains):
    counts, extents = [], []
    for top in chains:
        calls, out = lseeks(top.parent, "map", "--output=json", top.name)
        counts.append(len(calls))
        extents.append(len(map_extents(out)))
    # The chains differ enough for a per-extent cost to show.
    assert extents[1] > 10 * extents[0], extents
    assert counts[1] <= counts[0], \
        f"lseeks {counts} for {extents} extents: one per extent?"


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_convert_lseeks_do_not_grow_with_extents(chains, fmt):
    counts = []
    for top in chains:
        calls, _ = lseeks(top.parent, "convert", "-O", fmt, top.name,
                          f"out.{fmt}")
        counts.append(len(calls))
    assert counts[1] <= counts[0], f"lseeks {counts}: one per extent?"


def test_preallocated_map_walks_each_data_run_once(tmp_path):
    """4 KiB clusters and metadata preallocation: the file is asked about
    every L2 table's worth of data (2 MiB here), as QEMU asks it, and the
    run of data at the start of the file is walked once (one SEEK_HOLE),
    not again from each table: at most one lseek per extent."""
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-o",
        "preallocation=metadata,cluster_size=4k", "t.qcow2", str(64 * MiB),
        cwd=tmp_path)
    qemu_io(tmp_path, "t.qcow2", [f"write -P 5 0 {32 * MiB}"])
    calls, out = lseeks(tmp_path, "map", "--output=json", "t.qcow2")
    q = run(qemu_img(), "map", "--output=json", "t.qcow2", cwd=tmp_path)
    assert out == q.stdout
    n = len(map_extents(out))
    assert n >= 32, out
    holes = [c for c in calls if "SEEK_HOLE" in c]
    assert len(holes) <= 2, holes
    assert len(calls) <= n + 2, f"{len(calls)} lseeks for {n} extents"
