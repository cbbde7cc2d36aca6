"""block-stream is restartable: stratad is killed with SIGKILL at seeded
points of a stream; afterwards the top image passes qemu-img check (leaked
clusters at worst), reads the same as before, and a new block-stream
completes, copying only what the first one had not (the clusters it had
copied keep their host offsets).

Seeds: STRATA_SEED=N runs one seed; the default runs a fixed few.  A
failure prints the seed.
"""
import json
import os
import random

import pytest

from harness import run, wait_until
from harness.chains import add_top, make_chain
from harness.daemons import start
from harness.qcow2 import MiB as MIB

SIZE_MIB = 32
SEEDS = ([int(os.environ["STRATA_SEED"])] if os.environ.get("STRATA_SEED")
         else [1, 2, 3, 4])


def top_extents(qemu_img, path):
    """{guest start: (length, host offset)} of what TOP itself holds."""
    m = json.loads(run(qemu_img, "map", "--output=json", path).stdout)
    return {e["start"]: (e["length"], e.get("offset"))
            for e in m if e["depth"] == 0 and e["data"]}


def host_of(extents, guest):
    """Host offset of GUEST in TOP, or None."""
    for start, (length, host) in extents.items():
        if start <= guest < start + length:
            return None if host is None else host + guest - start
    return None


def check_after_kill(qemu_img, path):
    r = run(qemu_img, "check", "--output=json", path, check=False)
    assert r.returncode in (0, 3), r.stdout + r.stderr   # 3: leaks only
    res = json.loads(r.stdout)
    assert res.get("corruptions", 0) == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_kill_mid_stream_then_restart(tmp_path, qemu_img, qemu_io, seed):
    rng = random.Random(seed)
    p = make_chain(tmp_path, qemu_img, qemu_io, SIZE_MIB)
    ref = str(tmp_path / "ref.raw")
    run(qemu_img, "convert", "-O", "raw", p["top"], ref)
    # Where to kill: a fraction of the job's progress, or (seed 4) while
    # the job waits for job-finalize, before the backing pointer moves.
    pending = seed % 4 == 0
    target = rng.uniform(0.05, 0.95) * SIZE_MIB * MIB
    print(f"seed {seed}: kill at {'pending' if pending else int(target)}")

    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    d.ok("block-stream", **{"job-id": "j1", "device": "top",
                            "speed": 16 * MIB,
                            "auto-finalize": not pending})
    if pending:
        d.event("BLOCK_JOB_PENDING", timeout=30)
    else:

        def reached():
            jobs = d.ok("query-jobs")
            return not jobs or jobs[0]["current-progress"] >= target
        wait_until(reached, 30, 0.01, what="the job to make progress")
    d.kill()

    check_after_kill(qemu_img, p["top"])
    run(qemu_img, "compare", "-f", "qcow2", "-F", "raw", p["top"], ref)
    before = top_extents(qemu_img, p["top"])
    info = json.loads(run(qemu_img, "info", "--output=json",
                          p["top"]).stdout)
    if pending:
        assert info["backing-filename"] == p["mid"]

    # Change the base under everything the top already holds: the guest
    # view stays the same (the top shadows it), and a second stream that
    # copied those ranges again would bring the new bytes up.
    for start_, (length, _) in before.items():
        run(qemu_io, "-f", "qcow2", "-c",
            f"write -P 0x99 {start_} {length}", p["base"])
    run(qemu_img, "compare", "-f", "qcow2", "-F", "raw", p["top"], ref)

    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    d.ok("block-stream", **{"job-id": "j2", "device": "top"})
    e = d.event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in e["data"]
    assert d.stop() == 0

    run(qemu_img, "check", p["top"])
    run(qemu_img, "compare", "-f", "qcow2", "-F", "raw", p["top"], ref)
    info = json.loads(run(qemu_img, "info", "--output=json",
                          p["top"]).stdout)
    assert "backing-filename" not in info
    after = top_extents(qemu_img, p["top"])
    # What the top held stayed where it was.
    for start_, (length, host) in before.items():
        for g in range(start_, start_ + length, 64 * 1024):
            assert host_of(after, g) == host_of(before, g), (seed, g)
