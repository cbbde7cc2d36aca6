"""strata_block_status() on qcow2 matches qemu-img map, cluster by cluster.

qcow2_map.c (built here against libstrata.a) prints every block-status
answer: depth, allocated, zero, data and the host offset.  For each
cluster, those must equal what 'qemu-img map --output=json' says: the same
layer, the same zero/data flags, and for data the same host offset.  The
program also opens with STRATA_OPEN_NO_BACKING, which must hide the
backing file.
"""
import json
import os

import pytest

from harness import build_libstrata_program, run
from harness.qcow2 import KiB, MiB, create, qemu_img, qio

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def mapper(tmp_path_factory):
    return build_libstrata_program(tmp_path_factory.mktemp("mapper"), "qcow2_map.c")


def strata_clusters(mapper, img, gran, no_backing=False):
    p = run(mapper, *(["-n"] if no_backing else []), img)
    lines = p.stdout.splitlines()
    info = lines.pop().split()
    out = {}
    for line in lines:
        start, length, depth, alloc, zero, data, off = line.split()
        start, length = int(start), int(length)
        for c in range(start, start + length, gran):
            assert (c - start) % gran == 0
            out[c] = (int(depth) if int(alloc) else None, int(zero),
                      int(data),
                      int(off) + (c - start) if data == "1" and off != "-"
                      else None)
    return out, int(info[1]), int(info[3])


def qemu_clusters(img, gran, chain_len):
    ext = json.loads(run(qemu_img(), "map", "--output=json", img).stdout)
    out = {}
    for e in ext:
        for c in range(e["start"], e["start"] + e["length"], gran):
            present = e.get("present", True)
            depth = e["depth"] if present and e["depth"] < chain_len else None
            data = int(e["data"])
            off = (e["offset"] + (c - e["start"])
                   if data and "offset" in e else None)
            out[c] = (depth, int(e["zero"]), data, off)
    return out


@pytest.mark.parametrize("cs,ext", [(4 * KiB, "off"), (64 * KiB, "off"),
                                    (64 * KiB, "on")])
def test_block_status_matches_qemu(tmp_path, mapper, cs, ext):
    size = 4 * MiB
    gran = cs // 32 if ext == "on" else cs
    base = tmp_path / "base.qcow2"
    create(base, 3 * MiB, cluster_size=cs)
    qio(base, ["write -q -P 0xb0 0 1M", "write -q -z 1M 256k"])
    top = tmp_path / "top.qcow2"
    create(top, size, backing="base.qcow2", cluster_size=cs,
           **({"extended_l2": "on"} if ext == "on" else {}))
    qio(top, [f"write -q -P 0x11 {cs} {3 * cs}",
              f"write -q -P 0x12 {20 * cs + gran} {2 * gran}",
              f"write -q -z {40 * cs} {cs}",
              f"write -q -P 0x13 {3 * MiB + cs} {cs}"])
    s, cluster_size, has_backing = strata_clusters(mapper, top, gran)
    q = qemu_clusters(top, gran, 2)
    assert cluster_size == cs and has_backing == 1
    # Past the end of the shorter backing file QEMU reports depth 1, zero;
    # strata reports unallocated zeros there.  Compare the rest exactly.
    diffs = [(c, s[c], q[c]) for c in sorted(q)
             if c < 3 * MiB or q[c][0] == 0]
    diffs = [d for d in diffs if d[1] != d[2]]
    assert not diffs, f"first differences (cluster, strata, qemu): {diffs[:5]}"

    # Without the backing file only the top layer shows.
    s, _, has_backing = strata_clusters(mapper, top, gran, no_backing=True)
    assert has_backing == 0
    for c, (depth, zero, data, off) in s.items():
        assert depth in (0, None)
        if q[c][0] == 0:
            assert (depth, zero, data, off) == q[c]


@pytest.mark.parametrize("cs", [4 * KiB, 64 * KiB])
def test_partial_zero_writes_map_as_qemu(tmp_path, cs):
    """write -z over part of a cluster: where the rest of the cluster reads
    as zeros already, the whole cluster becomes a zero cluster (as QEMU
    does); elsewhere zeros are written as data.  Same map, same content."""
    from harness.qcow2 import sio
    ops = ["write -q -P 1 1M 64k", "write -q -z 8k 1k", "write -q -z 1M 4k",
           "write -q -z 2162688 8k", "write -q -P 2 3200k 64k",
           "write -q -z 3210k 1k", "write -q -z 1500k 100k",
           "write -q -z 4090k 10k", "write -q -z 60k 8k"]
    maps = []
    for tool in (qio, sio):
        img = tmp_path / f"{tool.__name__}.qcow2"
        create(img, 4100 * KiB, cluster_size=cs)
        tool(img, ops)
        maps.append(run(qemu_img(), "map", "--output=json", img).stdout)
        run(qemu_img(), "check", img)
    assert maps[0] == maps[1]
    # The cluster under "write -z 8k 1k" is now a zero cluster.
    entry = [e for e in json.loads(maps[1])
             if e["start"] <= 8 * KiB < e["start"] + e["length"]][0]
    assert (entry["present"], entry["zero"], entry["data"]) == \
        (True, True, False)
    run(qemu_img(), "compare", tmp_path / "qio.qcow2", tmp_path / "sio.qcow2")
