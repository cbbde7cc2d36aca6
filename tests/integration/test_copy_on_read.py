"""Copy-on-read: strata-io -C and the copy-on-read filter (node_copy_up).

Reads through the filter must copy what the overlay lacks into it: data as
data clusters, regions of the chain that read as zeros as zero clusters
(qemu-img map: "zero": true, "data": false, depth 0), never anything the
overlay already holds.  The overlay then holds the chain's content on its
own (qemu-img compare with the chain), and qemu-img check finds nothing.
"""
import json
import os

import pytest

from harness import binary, build_libstrata_program, file_state, need, run
from harness.daemons import Monitor, StrataNbd, nbd_handle
from harness.qcow2 import KiB, MiB, create, qemu_check, qemu_img, qio, sio

CS = 64 * KiB


def cluster_map(path):
    """{cluster offset: (depth, zero, data)} from qemu-img map."""
    p = run(qemu_img(), "map", "--output=json", str(path))
    out = {}
    for e in json.loads(p.stdout):
        for c in range(e["start"], e["start"] + e["length"], CS):
            out[c] = (e["depth"] if e["present"] else None, e["zero"],
                      e["data"])
    return out


@pytest.fixture
def chain(tmp_path):
    """base.qcow2 with data at 0-64k, a zero cluster at 128k-256k, data of
    zeros at 256k-320k (a data cluster in base) and data at 1M-1M+100k;
    top.qcow2 an empty overlay.  Returns (base, top)."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, 4 * MiB)
    qio(base, ["write -q -P 0x11 0 64k", "write -q -z 128k 128k",
               "write -q -P 0 256k 64k", "write -q -P 0x33 1M 100k"])
    create(top, 4 * MiB, backing="base.qcow2")
    return base, top


def test_read_copies_chain_into_overlay(chain):
    base, top = chain
    base_before = file_state(base)
    p = sio(top, ["read -P 0x11 0 64k", "read -P 0 64k 960k",
                  "read -P 0x33 1M 100k", "read -P 0 1124k 2972k"],
            extra=["-C"])
    assert "verification failed" not in p.stdout
    m = cluster_map(top)
    assert m[0] == (0, False, True)
    # Unallocated everywhere below: nothing to copy.
    assert m[64 * KiB][0] != 0
    # A zero cluster and a data cluster of zeros become zero clusters.
    for c in range(128 * KiB, 320 * KiB, CS):
        assert m[c] == (0, True, False), (c, m[c])
    assert m[MiB] == (0, False, True) and m[MiB + CS] == (0, False, True)
    assert m[2 * MiB][0] != 0
    qemu_check(top)
    run(qemu_img(), "compare", top, base)
    assert file_state(base) == base_before
    # The overlay now holds the data on its own.
    alone = f"json:{{\"driver\":\"qcow2\",\"backing\":null,\"file\":" \
            f"{{\"driver\":\"file\",\"filename\":\"{top}\"}}}}"
    p = run("qemu-io", "-r", "-c", "read -P 0x11 0 64k", "-c",
            "read -P 0x33 1M 100k", alone)
    assert "verification failed" not in p.stdout


def test_only_read_clusters_are_copied(chain):
    base, top = chain
    sio(top, ["read 1040k 8k"], extra=["-C"])
    m = cluster_map(top)
    assert m[MiB] == (0, False, True)
    assert [c for c, v in m.items() if v[0] == 0] == [MiB]
    run(qemu_img(), "compare", top, base)
    qemu_check(top)


def test_guest_data_in_overlay_is_kept(chain):
    base, top = chain
    qio(top, ["write -q -P 0x77 4k 4k"])
    sio(top, ["read 0 128k"], extra=["-C"])
    qio(top, ["read -q -P 0x11 0 4k", "read -q -P 0x77 4k 4k",
              "read -q -P 0x11 8k 56k"])
    qemu_check(top)


def test_writes_pass_through(chain):
    base, top = chain
    sio(top, ["write -P 0x55 2M 64k", "read -P 0x55 2M 64k"], extra=["-C"])
    qio(top, ["read -q -P 0x55 2M 64k"])
    assert cluster_map(top)[2 * MiB] == (0, False, True)


def test_read_only_is_refused_as_qemu_io(chain):
    base, top = chain
    before = file_state(top)
    p = sio(top, ["read 0 4k"], extra=["-C", "-r"], check=False)
    q = run("qemu-io", "-C", "-r", "-c", "read 0 4k", top, check=False)
    assert p.returncode == q.returncode == 1
    assert "Can't use copy-on-read on read-only device" in p.stderr
    assert p.stderr.split(": ", 1)[1] == q.stderr.split(": ", 1)[1]
    assert file_state(top) == before


def test_long_option_and_help():
    p = run(binary("strata-io"), "--help")
    assert "-C, --copy-on-read" in p.stdout


def test_v2_overlay_gets_zero_data(tmp_path):
    """compat=0.10 has no zero clusters: zeros are written as data."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, MiB)
    qio(base, ["write -q -P 0x22 0 64k", "write -q -z 64k 64k"])
    create(top, MiB, backing="base.qcow2", compat="0.10")
    sio(top, ["read 0 128k"], extra=["-C"])
    run(qemu_img(), "compare", top, base)
    qemu_check(top)
    assert cluster_map(top)[0] == (0, False, True)


@pytest.fixture(scope="module")
def stress(tmp_path_factory):
    return build_libstrata_program(tmp_path_factory.mktemp("corstress"),
                                   "cor_stress.c")


def test_guest_writes_win_over_copy_up(tmp_path, stress):
    cs, clusters = 16 * KiB, 2048
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, clusters * cs)
    qio(base, [f"write -q -P 0xbb 0 {clusters * cs}"])
    create(top, clusters * cs, backing="base.qcow2", cluster_size=cs)
    expected, out = tmp_path / "expected.raw", tmp_path / "out.raw"
    run(stress, top, expected, cs, clusters, 4, 4, 2, timeout=120)
    qemu_check(top)
    run(qemu_img(), "convert", "-O", "raw", top, out)
    assert out.read_bytes() == expected.read_bytes()


# ---- strata-nbd --copy-on-read ----

def test_nbd_copy_on_read_read_only_export(chain):
    base, top = chain
    srv = StrataNbd(top.parent, top, "-r", "-t", "--copy-on-read")
    try:
        p = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x33 1M 100k",
                srv.uri)
        assert "verification failed" not in p.stdout
        p = run("qemu-io", "-f", "raw", "-c", "write 0 4k", srv.uri,
                check=False)
        assert p.returncode == 1 and "Permission denied" in p.stderr
    finally:
        srv.stop()
    m = cluster_map(top)
    assert m[MiB] == (0, False, True) and m[MiB + CS] == (0, False, True)
    assert m[0][0] != 0  # not read
    run(qemu_img(), "compare", top, base)
    qemu_check(top)


@pytest.mark.parametrize("cor", [True, False])
def test_nbd_cache_command_prefetches(chain, cor):
    """NBD_CMD_CACHE (libnbd's nbd_cache) on a copy-on-read export copies
    the range into the overlay as a read would, with no data sent; on a
    plain export it changes nothing (QEMU's prefetch)."""
    base, top = chain
    before = cluster_map(top)
    srv = StrataNbd(top.parent, top, "-t",
                    *(["--copy-on-read"] if cor else []))
    try:
        nbd, h = nbd_handle(srv.uri)
        assert h.can_cache()
        h.cache(1088 * KiB, 64 * KiB)   # 64k-1152k: zeros and 0x33 data
        h.shutdown()
    finally:
        srv.stop()
    m = cluster_map(top)
    if not cor:
        assert m == before
    else:
        assert m[0][0] != 0             # outside the range: untouched
        for c in range(128 * KiB, 320 * KiB, CS):
            assert m[c] == (0, True, False), (c, m[c])
        assert m[MiB] == (0, False, True) and m[MiB + CS] == (0, False, True)
        assert m[64 * KiB][0] != 0      # nothing below to copy
        assert m[2 * MiB][0] != 0
    run(qemu_img(), "compare", top, base)
    qemu_check(top)


def test_nbd_copy_on_read_refuses_force_share(chain):
    base, top = chain
    p = run(binary("strata-nbd"), "-r", "-U", "--copy-on-read", "-k",
            top.parent / "s.sock", top, check=False)
    assert p.returncode == 1 and "--force-share" in p.stderr


# ---- the filter from blockdev-add, with bottom ----

def test_blockdev_add_bottom_as_qsd(tmp_path):
    """A <- B <- C; copy-on-read over C with bottom=B copies B's data
    only; qemu-storage-daemon leaves the same map."""
    maps = {}
    for name, argv0 in (("qsd", "qemu-storage-daemon"),
                        ("stratad", binary("stratad"))):
        d = tmp_path / name
        d.mkdir()
        a, b, c = d / "A.qcow2", d / "B.qcow2", d / "C.qcow2"
        create(a, 2 * MiB)
        qio(a, ["write -q -P 1 0 2M"])
        create(b, 2 * MiB, backing="A.qcow2")
        qio(b, ["write -q -P 2 64k 64k", "write -q -z 256k 64k"])
        create(c, 2 * MiB, backing="B.qcow2")
        qio(c, ["write -q -P 3 128k 64k"])
        raw = d / "orig.raw"
        run(qemu_img(), "convert", "-O", "raw", c, raw)
        mon = Monitor(argv0, d, name)
        sock = str(d / "nbd.sock")
        try:
            for node, path in (("a", a), ("b", b)):
                mon.ok("blockdev-add", driver="qcow2", **{"node-name": node},
                       file={"driver": "file", "filename": str(path)},
                       **({"backing": "a"} if node == "b" else {}),
                       **{"read-only": True})
            mon.ok("blockdev-add", driver="qcow2", **{"node-name": "c"},
                   file={"driver": "file", "filename": str(c)}, backing="b")
            bad = mon.cmd("blockdev-add", driver="copy-on-read",
                          **{"node-name": "x"}, file="c", bottom="nope")
            assert "error" in bad
            mon.ok("blockdev-add", driver="copy-on-read",
                   **{"node-name": "cor"}, file="c", bottom="b")
            mon.ok("nbd-server-start",
                   addr={"type": "unix", "data": {"path": sock}})
            mon.ok("block-export-add", type="nbd", id="e0",
                   **{"node-name": "cor"}, name="disk")
            run("qemu-io", "-r", "-f", "raw", "-c", "read 0 1M",
                f"nbd+unix:///disk?socket={sock}")
            mon.ok("block-export-del", id="e0")
            mon.ok("nbd-server-stop")
        finally:
            assert mon.stop() == 0
        run(qemu_img(), "compare", "-F", "raw", c, raw)
        qemu_check(c)
        maps[name] = cluster_map(c)
        # B's data is in C now; A's stays in A.  Both NBD servers answer
        # zero extents with holes without reading, so B's zero cluster is
        # not read and not copied.
        assert maps[name][64 * KiB] == (0, False, True)
        assert maps[name][256 * KiB][0] == 1
        assert maps[name][0][0] != 0
    assert maps["stratad"] == maps["qsd"]


def test_bottom_naming_a_filter_is_refused_as_qsd(tmp_path):
    """bottom naming a filter, even one in the chain (blkdebug over B),
    is refused with qemu-storage-daemon's words, and nothing is added."""
    a, b, c = tmp_path / "A.qcow2", tmp_path / "B.qcow2", tmp_path / "C.qcow2"
    create(a, 2 * MiB)
    create(b, 2 * MiB, backing="A.qcow2")
    create(c, 2 * MiB, backing="B.qcow2")
    replies = {}
    for name, argv0 in (("qsd", need("qemu-storage-daemon",
                                     "qemu-system-common")),
                        ("stratad", binary("stratad"))):
        mon = Monitor(argv0, tmp_path, name)
        try:
            mon.ok("blockdev-add", driver="qcow2", **{"node-name": "a"},
                   file={"driver": "file", "filename": str(a)},
                   **{"read-only": True})
            mon.ok("blockdev-add", driver="qcow2", **{"node-name": "b"},
                   file={"driver": "file", "filename": str(b)}, backing="a",
                   **{"read-only": True})
            mon.ok("blockdev-add", driver="blkdebug", **{"node-name": "bf"},
                   image="b", **{"read-only": True})
            mon.ok("blockdev-add", driver="qcow2", **{"node-name": "c"},
                   file={"driver": "file", "filename": str(c)},
                   backing="bf")
            replies[name] = [
                mon.cmd("blockdev-add", driver="copy-on-read",
                        **{"node-name": "cor"}, file="c", bottom="bf"),
                mon.cmd("blockdev-del", **{"node-name": "cor"})]
        finally:
            assert mon.stop() == 0
    assert replies["qsd"][0]["error"]["desc"] == (
        "Bottom node 'bf' is a filter")
    assert replies["stratad"] == replies["qsd"]


def test_reopened_read_only_reads_without_copying(chain):
    base, top = chain
    p = sio(top, ["reopen -r", "read -P 0x11 0 64k", "reopen -w",
                  "read -P 0x33 1M 64k"], extra=["-C"])
    assert "verification failed" not in p.stdout
    m = cluster_map(top)
    assert m[0][0] != 0 and m[MiB] == (0, False, True)
