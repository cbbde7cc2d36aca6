"""strata copy, modelled on virsh blockcopy, against qemu-storage-daemon
and stratad on the chain of test_strata_pull.py (base <- mid <- top): a
copy into a new file (full, or --shallow over top's backing file) or into
a node (--blockdev), finished with --pivot or --finish, or left mirroring;
qemu-img is the oracle for the copies."""
import pytest

from harness import run
from test_strata_pull import (  # noqa: F401
    backing, chain, daemon, jobs, stopped, strata)


@pytest.mark.parametrize("how, said", [
    ("--pivot", "Successfully pivoted"),
    ("--finish", "Successfully copied"),
])
@pytest.mark.parametrize("shallow", [False, True])
def test_copy_to_a_new_file(daemon, chain, how, said, shallow):
    dest = chain / "copy.qcow2"
    extra = ["--shallow"] if shallow else []
    p = strata(daemon, "copy", "top", "--dest", str(dest), how, *extra)
    assert (p.returncode, p.stdout) == (0, f"{said}\n"), p.stderr
    assert jobs(daemon) == []
    stopped(daemon, chain)
    run("qemu-img", "check", dest)
    assert backing(dest) == ("mid.qcow2" if shallow else None)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
        chain / "expected.raw", dest)


def test_copy_into_a_node_left_mirroring(daemon, chain):
    run("qemu-img", "create", "-q", "-f", "qcow2", chain / "n.qcow2", "64M")
    p = strata(daemon, "add", "driver=qcow2", "node-name=n",
               "file.driver=file", f"file.filename={chain / 'n.qcow2'}")
    assert p.returncode == 0, p.stderr
    p = strata(daemon, "copy", "top", "--dest", "n", "--blockdev", "--wait")
    assert (p.returncode, p.stdout) == (0, "Now in mirroring phase\n"), \
        p.stderr
    [job] = jobs(daemon)
    assert (job["type"], job["ready"]) == ("mirror", True)
    assert strata(daemon, "job", "top", "--abort").returncode == 0
    stopped(daemon, chain)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
        chain / "expected.raw", chain / "n.qcow2")


@pytest.mark.parametrize("argv, why", [
    (["--dest", "x", "--pivot", "--finish"],
     "--pivot and --finish exclude each other"),
    (["--dest", "x", "--blockdev", "--format", "raw"],
     "--blockdev takes a node: no --format"),
    (["--dest", "x", "--verbose"], "--verbose needs --wait"),
])
def test_copy_refusals_send_nothing(daemon, chain, argv, why):
    p = strata(daemon, "copy", "top", *argv)
    assert (p.returncode, p.stdout, p.stderr) == (1, "",
                                                 f"strata: copy: {why}\n")
    assert jobs(daemon) == []


def test_job_pivot(daemon, chain):
    """strata job ID --pivot completes a synchronised copy and waits for
    the end (prints nothing, as virsh blockjob --pivot); before READY the
    daemon refuses it (exit 1, its one line)."""
    dest = chain / "copy.qcow2"
    p = strata(daemon, "copy", "top", "--dest", str(dest), "--bandwidth",
               "1")
    assert p.returncode == 0, p.stderr
    p = strata(daemon, "job", "top", "--pivot")
    assert p.returncode == 1 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith(
        "strata: "), p.stderr
    assert strata(daemon, "job", "top", "--bandwidth", "0").returncode == 0
    from harness import wait_until
    wait_until(lambda: jobs(daemon)[0]["ready"], 60, 0.1,
               what="the copy to be synchronised")
    p = strata(daemon, "job", "top", "--pivot")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert jobs(daemon) == []
    stopped(daemon, chain)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
        chain / "expected.raw", dest)
