"""Backing chains built with qemu-img and qemu-io, and what tests read
back from them.

- make_chain: base <- mid <- top with absolute backing names and one
  pattern per layer (the block-job tests' chain); add_top opens its top
  in a daemon.
- make_mixed_chain: base <- mid <- top with relative backing names and
  every kind of cluster (data, zero, compressed, an unaligned write) at a
  given cluster size (the commit and rebase tests' chain).
- map_of: qemu-img map without host offsets, adjacent runs merged.
- statuses / check_image: a job's event sequence; qemu-img check passes.
- both: one scenario on qemu-storage-daemon then stratad, each on a
  fresh make_chain().
"""
import json
import os

from .env import run
from .qcow2 import MiB, create, qemu_img, qio


def make_chain(tmp, qemu_img, qemu_io, size_mib=4, names=("base", "mid",
                                                          "top")):
    """base <- mid <- top (absolute backing names): base fully written
    with 1s, mid with 2s at [1M, 2M), top with 3s at [0, 64k)."""
    tmp.mkdir(parents=True, exist_ok=True)
    p = {n: str(tmp / f"{n}.qcow2") for n in names}
    prev = None
    for n in names:
        args = ["-F", "qcow2", "-b", p[prev]] if prev else []
        run(qemu_img, "create", "-q", "-f", "qcow2", *args, p[n],
            f"{size_mib}M")
        prev = n
    cmds = {names[0]: f"write -P 1 0 {size_mib}M",
            names[1]: "write -P 2 1M 1M",
            names[2]: "write -P 3 0 64k"}
    for n in names:
        run(qemu_io, "-f", "qcow2", "-c", cmds[n], p[n])
    return p


def add_top(d, path, name="top"):
    """blockdev-add the qcow2 image PATH as node NAME in daemon D."""
    d.ok("blockdev-add", **{"driver": "qcow2", "node-name": name,
                            "file": {"driver": "file", "filename": path}})


def statuses(events):
    """The job's event sequence: JOB_STATUS_CHANGE as their status, other
    events by name."""
    return [e["data"]["status"] if e["event"] == "JOB_STATUS_CHANGE"
            else e["event"] for e in events]


def check_image(qemu_img, path):
    r = run(qemu_img, "check", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def make_mixed_chain(d, cs, top_size=None, **opts):
    """base <- mid <- top in directory D with cluster size CS."""
    os.makedirs(d, exist_ok=True)
    size = max(4 * MiB, 16 * cs)
    create(d / "base.qcow2", size, cluster_size=cs, **opts)
    create(d / "mid.qcow2", size, backing="base.qcow2", cluster_size=cs,
           **opts)
    create(d / "top.qcow2", top_size or size, backing="mid.qcow2",
           cluster_size=cs, **opts)
    qio(d / "base.qcow2", [f"write -P 1 0 {8 * cs}",
                           f"write -P 5 {12 * cs} {2 * cs}"])
    qio(d / "mid.qcow2", [f"write -P 2 {2 * cs} {4 * cs}",
                          f"write -z {10 * cs} {2 * cs}",
                          f"write -P 6 {13 * cs} {3 * cs}"])
    top = [f"write -P 3 {3 * cs} {3 * cs}", f"write -z 0 {cs}",
           f"write -c -P 4 {8 * cs} {cs}", f"write -P 8 {5 * cs + 512} 1024",
           f"write -z {13 * cs} {cs}"]
    if top_size:
        top.append(f"write -P 9 {top_size - 2 * cs} {cs}")
    qio(d / "top.qcow2", top)


def map_of(path):
    """qemu-img map of PATH without host offsets, adjacent runs merged."""
    p = run(qemu_img(), "map", "--output=json", path.name, cwd=path.parent)
    out = []
    for e in json.loads(p.stdout):
        e = {k: v for k, v in e.items() if k != "offset"}
        if out and all(out[-1][k] == e[k] for k in e if
                       k not in ("start", "length")):
            out[-1]["length"] += e["length"]
        else:
            out.append(e)
    return out


def both(tmp, qemu_img, qemu_io, scenario, size_mib=4):
    """SCENARIO(daemon, paths) on qsd then stratad, each on a fresh chain;
    returns (qsd result, stratad result, qsd paths, stratad paths)."""
    from .daemons import start
    out = []
    for kind in ("qsd", "stratad"):
        p = make_chain(tmp / kind, qemu_img, qemu_io, size_mib)
        d = start(kind, tmp / kind)
        try:
            out.append((scenario(d, p), p))
        finally:
            assert d.stop() == 0
    return out[0][0], out[1][0], out[0][1], out[1][1]
