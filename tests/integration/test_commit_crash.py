"""block-commit (intermediate) is restartable: stratad is killed with
SIGKILL at seeded points of a commit of mid into base (base <- mid <- top);
afterwards every image passes qemu-img check (leaked clusters at worst),
top reads as before, and the same commit run again completes: top then
names base, reads as before, and base reads as mid did.

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


def check_after_kill(qemu_img, path):
    r = run(qemu_img, "check", "--output=json", path, check=False)
    assert r.returncode in (0, 3), r.stdout + r.stderr   # 3: leaks only
    assert json.loads(r.stdout).get("corruptions", 0) == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_kill_mid_commit_then_restart(tmp_path, qemu_img, qemu_io, seed):
    rng = random.Random(seed)
    p = make_chain(tmp_path, qemu_img, qemu_io, SIZE_MIB)
    # mid gets a quarter of its clusters, scattered, so the job has work
    # all along the image.
    clusters = rng.sample(range(SIZE_MIB * 16), SIZE_MIB * 4)
    cmds = [c for i in clusters
            for c in ("-c", f"write -P {0x40 + i % 64} {i * 65536} 64k")]
    run(qemu_io, "-f", "qcow2", *cmds, p["mid"])
    refs = {n: str(tmp_path / f"{n}.raw") for n in ("top", "mid")}
    for n, ref in refs.items():
        run(qemu_img, "convert", "-O", "raw", p[n], ref)
    pending = seed % 4 == 0
    target = rng.uniform(0.05, 0.95) * SIZE_MIB * MIB
    print(f"seed {seed}: kill at {'pending' if pending else int(target)}")

    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    d.ok("block-commit", **{"job-id": "j1", "device": "top",
                            "top": p["mid"], "speed": 4 * MIB,
                            "auto-finalize": not pending})
    if pending:
        d.event("BLOCK_JOB_PENDING", timeout=60)
    else:

        seen = []

        def reached():
            jobs = d.ok("query-jobs")
            seen[:] = jobs
            return not jobs or jobs[0]["current-progress"] >= target
        wait_until(reached, 60, 0.01, what="the job to make progress")
        # The rate limit keeps it running for seconds: killed mid-way.
        assert seen and seen[0]["status"] == "running", seen
    d.kill()

    for n in ("base", "mid", "top"):
        check_after_kill(qemu_img, p[n])
    run(qemu_img, "compare", "-f", "qcow2", "-F", "raw", p["top"],
        refs["top"])
    run(qemu_img, "compare", "-f", "qcow2", "-F", "raw", p["mid"],
        refs["mid"])
    info = json.loads(run(qemu_img, "info", "--output=json",
                          p["top"]).stdout)
    if pending:
        assert info["backing-filename"] == p["mid"]

    d = start("stratad", tmp_path)
    add_top(d, p["top"])
    d.ok("block-commit", **{"job-id": "j2", "device": "top",
                            "top": p["mid"]})
    e = d.event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in e["data"]
    assert d.stop() == 0

    for n in ("base", "mid", "top"):
        run(qemu_img, "check", p[n])
    info = json.loads(run(qemu_img, "info", "--output=json",
                          p["top"]).stdout)
    assert info["backing-filename"] == p["base"]
    run(qemu_img, "compare", "-f", "qcow2", "-F", "raw", p["top"],
        refs["top"])
    run(qemu_img, "compare", "-f", "qcow2", "-F", "raw", p["base"],
        refs["mid"])
