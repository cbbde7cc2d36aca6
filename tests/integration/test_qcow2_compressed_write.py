"""Compressed-cluster writes (strata-io write -c, as qemu-io's), checked by
qemu-img check and qemu-io, and against qemu-io doing the same writes."""
import json
import shutil

import pytest

from harness import binary, run
from harness.qcow2 import qemu_img, qemu_io

OPTS = ["cluster_size=65536", "cluster_size=4096,compression_type=zstd",
        "cluster_size=512,compat=0.10", "cluster_size=16384,extended_l2=on",
        "cluster_size=2M"]


def io(tool, img, *cmds, check=True):
    args = []
    for c in cmds:
        args += ["-c", c]
    return run(tool, "-f", "qcow2", *args, img, check=check)


def check_json(img):
    out = json.loads(run(qemu_img(), "check", "--output=json", img).stdout)
    assert out["check-errors"] == 0
    assert out.get("leaks", 0) == 0 and out.get("corruptions", 0) == 0, out
    return out


@pytest.mark.parametrize("opts", OPTS)
def test_compressed_writes_match_qemu(tmp_path, opts):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-o", opts, ours, "9M")
    shutil.copy(ours, theirs)
    # QEMU compresses only into unallocated clusters; so do these writes.
    cmds = ["write -c -P 7 0 4M", "write -c -P 9 4M 2M", "write -P 5 4M 4k",
            "discard 1M 1M", "write -c -P 8 8M 1M"]
    io(binary("strata-io"), ours, *cmds)
    io(qemu_io(), theirs, *cmds)
    out = check_json(ours)
    assert out.get("compressed-clusters", 0) > 0
    run(qemu_img(), "compare", ours, theirs)
    p = io(qemu_io(), ours, "read -P 7 0 1M",
           "read -P 5 4M 4k", "read -P 9 4100k 1M", "read -P 8 8M 1M")
    assert "Pattern verification failed" not in p.stdout


@pytest.mark.parametrize("opts", OPTS)
def test_compressed_overwrites(tmp_path, opts):
    """Unlike QEMU, strata also compresses over allocated clusters (normal
    and compressed ones), freeing the old data once the new is mapped."""
    img = tmp_path / "ow.qcow2"
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-o", opts, img, "9M")
    io(binary("strata-io"), img, "write -P 1 0 1M", "write -c -P 7 0 4M",
       "write -c -P 9 4M 2M", "write -c -P 3 4M 2M", "write -P 5 4M 4k")
    out = check_json(img)
    assert out.get("compressed-clusters", 0) > 0
    p = io(qemu_io(), img, "read -P 7 0 4M", "read -P 5 4M 4k",
           "read -P 3 4100k 1M", "read -P 0 6M 3M")
    assert "Pattern verification failed" not in p.stdout


def test_freed_packing_cluster_is_not_reused(tmp_path):
    """A host cluster that held compressed data and was freed may be
    reallocated as an ordinary cluster; later compressed data must not be
    packed into it."""
    img = tmp_path / "reuse.qcow2"
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k",
        img, "1M")
    io(binary("strata-io"), img, "write -c -P 1 0 64k", "write -P 2 0 64k",
       "write -P 3 64k 64k", "write -c -P 4 128k 64k",
       "write -c -P 5 192k 64k")
    check_json(img)
    p = io(qemu_io(), img, "read -P 2 0 64k", "read -P 3 64k 64k",
           "read -P 4 128k 64k", "read -P 5 192k 64k")
    assert "Pattern verification failed" not in p.stdout


@pytest.mark.parametrize("fmt,cmd,needle", [
    ("qcow2", "write -c 1k 64k", "whole clusters"),
    ("qcow2", "write -c -z 0 64k", "-c and -z"),
    ("raw", "write -c 0 64k", "cannot store compressed"),
])
def test_compressed_write_refusals(tmp_path, fmt, cmd, needle):
    img = tmp_path / "x.img"
    run(qemu_img(), "create", "-q", "-f", fmt, img, "1M")
    before = img.read_bytes()
    p = run(binary("strata-io"), "-f", fmt, "-c", cmd, img, check=False)
    assert p.returncode == 1
    assert needle in p.stdout + p.stderr
    assert img.read_bytes() == before
