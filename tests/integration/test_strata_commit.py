"""strata commit, modelled on virsh blockcommit, against qemu-storage-daemon
and stratad on the chain of test_strata_pull.py (base <- mid <- top):
intermediate commits end as pulls do ("Commit complete"); active commits
reach the synchronised phase and pivot or keep the overlay with virsh's
messages.
qemu-img is the oracle for the images."""
import re

import pytest

from harness import run
from test_strata_pull import (  # noqa: F401
    LINE_RE, backing, chain, daemon, jobs, percent, stopped, strata)

COMMIT_LINE = LINE_RE.pattern.replace("Pull", "Commit")


def mid_view(chain):
    """What a guest saw through mid before the commit."""
    out = chain / "mid-view.raw"
    run("qemu-img", "convert", "-U", "-O", "raw", chain / "mid.qcow2", out)
    return out


def test_intermediate_commit_waits_and_shows_progress(daemon, chain):
    """--top mid --wait --verbose: progress lines rising to 100, "Commit
    complete"; top now backs onto base, reads as before, and base reads as
    mid did."""
    mid = mid_view(chain)
    p = strata(daemon, "commit", "top", "--top", "mid", "--wait",
               "--verbose", "--bandwidth", "4")
    assert (p.returncode, p.stdout) == (0, "Commit complete\n"), p.stderr
    lines = p.stderr.splitlines()
    assert lines and all(re.match(COMMIT_LINE, line) for line in lines), \
        lines
    values = [percent(line) for line in lines]
    assert values == sorted(values) and values[-1] == 100.0
    assert jobs(daemon) == []
    stopped(daemon, chain)
    assert backing(chain / "top.qcow2") == "base.qcow2"
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
        chain / "expected.raw", chain / "top.qcow2")
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", mid,
        chain / "base.qcow2")
    for n in ("base", "mid", "top"):
        run("qemu-img", "check", chain / f"{n}.qcow2")


def test_commit_started_then_aborted(daemon, chain):
    p = strata(daemon, "commit", "top", "--top", "mid", "--base", "base",
               "--bandwidth", "1")
    assert (p.returncode, p.stdout) == (0, "Block Commit started\n"), \
        p.stderr
    [job] = jobs(daemon)
    assert (job["device"], job["type"], job["speed"]) == ("top", "commit",
                                                          1 << 20)
    assert strata(daemon, "job", "top").stdout.startswith("Block Commit: [")
    p = strata(daemon, "job", "top", "--abort")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert jobs(daemon) == []
    stopped(daemon, chain)
    assert backing(chain / "top.qcow2") == "mid.qcow2"


@pytest.mark.parametrize("argv, why", [
    (["top"], "committing the active layer of top needs --active"),
    (["top", "--top", "top"],
     "committing the active layer of top needs --active"),
    (["top", "--active", "--top", "mid"],
     "--active commits the active layer of top, not 'mid'"),
    (["top", "--pivot", "--keep-overlay"],
     "--pivot and --keep-overlay exclude each other"),
    (["top", "--top", "mid", "--verbose"], "--verbose needs --wait"),
    (["top", "--top", "mid", "--bytes"], "--bytes needs --bandwidth"),
])
def test_commit_refusals_send_nothing(daemon, chain, argv, why):
    p = strata(daemon, "commit", *argv)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == f"strata: commit: {why}\n"
    assert jobs(daemon) == []


@pytest.mark.parametrize("how, said", [
    ("--pivot", "Successfully pivoted"),
    ("--keep-overlay", "Commit complete, overlay image kept"),
])
def test_active_commit(daemon, chain, how, said):
    """Synchronised, then pivoted or kept; either way base then reads as
    top did."""
    p = strata(daemon, "commit", "top", how, "--verbose")
    assert (p.returncode, p.stdout) == (0, f"{said}\n"), p.stderr
    assert jobs(daemon) == []
    stopped(daemon, chain)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
        chain / "expected.raw", chain / "base.qcow2")


def test_active_commit_stays_synchronised(daemon, chain):
    p = strata(daemon, "commit", "top", "--active", "--wait")
    assert (p.returncode, p.stdout) == (0, "Now in synchronized phase\n")
    [job] = jobs(daemon)
    assert (job["type"], job["ready"], job["status"]) == ("commit", True,
                                                          "ready")
    assert strata(daemon, "job", "top", "--abort").returncode == 0
