"""The block-graph QMP commands of stratad against qemu-storage-daemon.

The same command sequence runs against qemu-storage-daemon (the oracle)
and stratad on the same image files, one daemon after the other, and the
replies are compared: query-named-block-nodes field by field (automatic
"#blockNNN" names and actual-size masked), errors by class and desc.
Images are checked with qemu-img after stratad exits.
"""
import json
import os
import re

import pytest

from harness import run
from harness.daemons import qsd, stratad


def mask(value):
    """Drop what differs between runs: automatic node names, allocation."""
    if isinstance(value, dict):
        return {k: mask(v) for k, v in value.items() if k != "actual-size"}
    if isinstance(value, list):
        return [mask(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"#block[0-9]+", "#block", value)
    return value


@pytest.fixture
def chain(tmp_path, qemu_img, qemu_io):
    """base <- mid <- top, absolute backing names, some data in each."""
    paths = {n: str(tmp_path / f"{n}.qcow2") for n in ("base", "mid", "top")}
    run(qemu_img, "create", "-q", "-f", "qcow2", paths["base"], "4M")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
        paths["base"], paths["mid"])
    run(qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
        paths["mid"], paths["top"])
    for i, n in enumerate(("base", "mid", "top")):
        run(qemu_io, "-f", "qcow2", "-c", f"write -P {i + 1} {i}M 64k",
            paths[n])
    return paths


def by_name_sequence(p):
    return [
        ("blockdev-add", {"driver": "file", "filename": p["base"],
                          "node-name": "fb"}),
        ("blockdev-add", {"driver": "qcow2", "file": "fb", "backing": None,
                          "node-name": "base"}),
        ("blockdev-add", {"driver": "file", "filename": p["mid"],
                          "node-name": "fm"}),
        ("blockdev-add", {"driver": "qcow2", "file": "fm", "backing": "base",
                          "node-name": "mid"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": p["top"]},
                          "backing": "mid"}),
    ]


def nested_sequence(p):
    def f(n):
        return {"driver": "file", "filename": p[n]}
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": f("top"),
                          "backing": {"driver": "qcow2", "node-name": "mid",
                                      "file": f("mid"),
                                      "backing": {"driver": "qcow2",
                                                  "file": f("base")}}}),
    ]


def filter_sequence(p):
    return by_name_sequence(p) + [
        ("blockdev-add", {"driver": "copy-on-read", "node-name": "cor",
                          "file": "top"}),
    ]


def run_sequence(mon, seq):
    replies = [mon.cmd(c, **a) for c, a in seq]
    replies.append(mon.cmd("query-named-block-nodes"))
    replies.append(mon.cmd("query-named-block-nodes", flat=True))
    return mask(replies)


def compare(theirs, ours):
    assert len(theirs) == len(ours)
    for t, o in zip(theirs, ours):
        if "return" in t and isinstance(t["return"], list):
            assert [n["node-name"] for n in o["return"]] == \
                [n["node-name"] for n in t["return"]]
            for tn, on in zip(t["return"], o["return"]):
                for key in tn:
                    assert on.get(key) == tn[key], \
                        f"{tn['node-name']}: field {key}"
                assert set(on) == set(tn), tn["node-name"]
        else:
            assert o == t


@pytest.mark.parametrize("sequence", [by_name_sequence, nested_sequence,
                                      filter_sequence])
def test_chain_matches_qsd(tmp_path, chain, sequence):
    seq = sequence(chain)
    m = qsd(tmp_path)
    theirs = run_sequence(m, seq)
    assert m.stop() == 0
    m = stratad(tmp_path)
    ours = run_sequence(m, seq)
    assert m.stop() == 0
    compare(theirs, ours)
    top = [n for n in ours[-2]["return"] if n["node-name"] == "top"]
    assert top[0]["backing_file_depth"] == 2


def error_sequence(p, tmp):
    f = {"driver": "file", "filename": p["mid"]}
    return [
        ("blockdev-add", {"driver": "file", "filename": p["base"],
                          "node-name": "fb"}),
        ("blockdev-add", {"driver": "file", "filename": p["base"],
                          "node-name": "fb"}),
        ("blockdev-add", {"driver": "file", "filename": str(tmp / "nope"),
                          "node-name": "x"}),
        ("blockdev-add", {"driver": "file", "filename": p["mid"]}),
        ("blockdev-add", {"driver": "file", "filename": p["mid"], "foo": 1,
                          "node-name": "y"}),
        ("blockdev-add", {"driver": "file", "filename": 5,
                          "node-name": "y"}),
        ("blockdev-add", {"driver": "file", "filename": p["mid"],
                          "node-name": "1bad"}),
        ("blockdev-add", {"driver": "file", "filename": p["mid"],
                          "node-name": "a" * 32}),
        ("blockdev-add", {"driver": "nope", "node-name": "y"}),
        ("blockdev-add", {"node-name": "y"}),
        ("blockdev-add", {"driver": "qcow2", "file": "nosuch",
                          "node-name": "y"}),
        ("blockdev-add", {"driver": "qcow2", "file": "fb",
                          "backing": "nosuch", "node-name": "y"}),
        ("blockdev-add", {"driver": "qcow2", "file": dict(f, bogus=1),
                          "node-name": "y"}),
        ("blockdev-add", {"driver": "qcow2", "file": f, "node-name": "y",
                          "l2-cache-size": "x"}),
        ("blockdev-add", {"driver": "qcow2", "file": f, "node-name": "y",
                          "l2-cache-entry-size": "x"}),
        ("blockdev-add", {"driver": "qcow2", "file": f, "node-name": "y",
                          "l2-cache-entry-size": 256}),
        ("blockdev-add", {"driver": "qcow2", "file": f, "node-name": "y",
                          "l2-cache-entry-size": 3000}),
        ("blockdev-add", {"driver": "qcow2", "file": f, "node-name": "y",
                          "cache": {"direct": "x"}}),
        ("blockdev-add", {"driver": "qcow2", "file": "fb", "backing": None,
                          "node-name": "base"}),
        ("blockdev-add", {"driver": "qcow2", "file": "fb", "backing": None,
                          "node-name": "base2"}),
        ("blockdev-add", {"driver": "qcow2", "file": f, "backing": "base",
                          "node-name": "mid"}),
        ("blockdev-del", {"node-name": "base"}),
        ("blockdev-del", {"node-name": "fb"}),
        ("blockdev-del", {"node-name": "nosuch"}),
        ("blockdev-del", {}),
        ("blockdev-snapshot", {"node": "nosuch", "overlay": "mid"}),
        ("blockdev-snapshot", {"node": "base", "overlay": "mid"}),
        ("blockdev-snapshot-sync", {"node-name": "nosuch",
                                    "snapshot-file": str(tmp / "o")}),
        ("blockdev-snapshot-sync", {"device": "nosuch",
                                    "snapshot-file": str(tmp / "o")}),
        ("blockdev-reopen", {"options": [{"driver": "file",
                                          "node-name": "fb",
                                          "filename": "/tmp/x"}]}),
        ("blockdev-reopen", {"options": [{"driver": "qcow2",
                                          "node-name": "mid"}]}),
        ("blockdev-del", {"node-name": "mid"}),
        ("blockdev-del", {"node-name": "base"}),
        ("blockdev-del", {"node-name": "base"}),
        ("blockdev-del", {"node-name": "fb"}),
        ("query-named-block-nodes", {}),
    ]


def test_errors_match_qsd(tmp_path, chain):
    seq = error_sequence(chain, tmp_path)
    m = qsd(tmp_path)
    theirs = [m.cmd(c, **a) for c, a in seq]
    assert m.stop() == 0
    m = stratad(tmp_path)
    ours = [m.cmd(c, **a) for c, a in seq]
    assert m.stop() == 0
    for (c, a), t, o in zip(seq, theirs, ours):
        assert o == t, f"{c} {a}"
    assert not os.path.exists(tmp_path / "o")


def test_del_implicit_node_not_owned(tmp_path, chain):
    m = stratad(tmp_path)
    m.ok("blockdev-add", driver="qcow2", **{"node-name": "top"},
         file={"driver": "file", "filename": chain["top"]})
    nodes = m.ok("query-named-block-nodes", flat=True)
    names = [n["node-name"] for n in nodes]
    # top, its file, then mid and base (each with a file) opened from the
    # headers: every layer is listed, none is owned by the monitor.
    assert len(names) == 6 and "top" in names
    for n in names:
        if n == "top":
            continue
        r = m.cmd("blockdev-del", **{"node-name": n})
        assert r["error"]["class"] == "GenericError"
        assert re.match(rf"(Node {n} is not owned by the monitor|"
                        rf"Node '{n}' is busy: node is used as backing hd)",
                        r["error"]["desc"]), r
    # Backing files opened from the headers are read-only.
    writable = sorted((n["drv"], n["file"]) for n in nodes if not n["ro"])
    assert writable == [("file", chain["top"]), ("qcow2", chain["top"])]
    m.ok("blockdev-del", **{"node-name": "top"})
    assert m.ok("query-named-block-nodes") == []
    assert m.stop() == 0


def test_reopen_read_only(tmp_path, chain, qemu_io):
    m = stratad(tmp_path)
    m.ok("blockdev-add", driver="file", filename=chain["top"],
         **{"node-name": "ft"})
    m.ok("blockdev-add", driver="qcow2", file="ft", **{"node-name": "top"})

    def ro():
        return {n["node-name"]: n["ro"]
                for n in m.ok("query-named-block-nodes", flat=True)
                if not n["node-name"].startswith("#")}
    assert ro() == {"top": False, "ft": False}
    m.ok("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "top",
                                      "file": "ft", "read-only": True}])
    assert ro() == {"top": True, "ft": True}
    # Read-only now: another process may take the write lock.
    run(qemu_io, "-f", "qcow2", "-U", "-r", "-c", "read 0 4k", chain["top"])
    m.ok("x-blockdev-reopen", options=[{"driver": "qcow2",
                                        "node-name": "top", "file": "ft"}])
    assert ro() == {"top": False, "ft": False}
    r = m.cmd("blockdev-reopen", options=[{"driver": "qcow2",
                                           "node-name": "top", "file": "ft",
                                           "l2-cache-size": 65536}])
    assert r["error"]["desc"] == "Cannot change the option 'l2-cache-size'"
    assert m.stop() == 0


def test_snapshot_sync_then_images_check(tmp_path, chain, qemu_img, qemu_io):
    ov = str(tmp_path / "ov.qcow2")
    m = stratad(tmp_path)
    m.ok("blockdev-add", driver="qcow2", **{"node-name": "top"},
         file={"driver": "file", "filename": chain["top"]})
    m.ok("blockdev-snapshot-sync", **{"node-name": "top",
                                      "snapshot-file": ov,
                                      "snapshot-node-name": "ov"})
    nodes = {n["node-name"]: n
             for n in m.ok("query-named-block-nodes", flat=True)}
    assert nodes["top"]["ro"] is True
    assert nodes["ov"]["ro"] is False
    assert nodes["ov"]["backing_file"] == chain["top"]
    assert nodes["ov"]["image"]["backing-filename-format"] == "qcow2"
    deep = m.ok("query-named-block-nodes")
    assert deep[0]["node-name"] == "ov"
    assert deep[0]["backing_file_depth"] == 3
    r = m.cmd("blockdev-del", **{"node-name": "top"})
    assert r["error"]["desc"] == \
        "Node 'top' is busy: node is used as backing hd of 'ov'"
    r = m.cmd("blockdev-snapshot-sync", **{"node-name": "top",
                                           "snapshot-file": ov + "2"})
    assert r["error"]["desc"] == \
        "Node 'top' is busy: node is used as backing hd of 'ov'"
    assert m.stop() == 0

    info = json.loads(run(qemu_img, "info", "--output=json",
                          "--backing-chain", ov).stdout)
    assert [i["filename"] for i in info] == \
        [ov, chain["top"], chain["mid"], chain["base"]]
    assert info[0]["backing-filename"] == chain["top"]
    assert info[0]["backing-filename-format"] == "qcow2"
    assert info[0]["virtual-size"] == 4 << 20
    for img in [ov, chain["top"], chain["mid"], chain["base"]]:
        run(qemu_img, "check", img)
        # The locks went with the daemon: qemu can write every image.
        run(qemu_io, "-f", "qcow2", "-c", "write 3M 4k", img)
    # The data of every layer reads through the new overlay.
    for i in range(3):
        run(qemu_io, "-f", "qcow2", "-r", "-c",
            f"read -P {i + 1} {i}M 64k", ov)


def test_blockdev_snapshot(tmp_path, chain, qemu_img, qemu_io):
    ov = str(tmp_path / "ov.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", ov, "4M")
    seq = [
        ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file",
                                   "filename": chain["top"]}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ov",
                          "backing": None,
                          "file": {"driver": "file", "filename": ov}}),
        ("blockdev-snapshot", {"node": "top", "overlay": "ov"}),
        ("blockdev-snapshot", {"node": "top", "overlay": "ov"}),
        ("query-named-block-nodes", {"flat": True}),
    ]
    m = qsd(tmp_path)
    theirs = mask([m.cmd(c, **a) for c, a in seq])
    assert m.stop() == 0
    m = stratad(tmp_path)
    ours = mask([m.cmd(c, **a) for c, a in seq])
    assert m.stop() == 0
    compare(theirs, ours)
    assert ours[3]["error"]["desc"] in (
        "The overlay already has a backing image",
        "Node 'top' is busy: node is used as backing hd of 'ov'")
    run(qemu_img, "check", ov)


def test_shutdown_closes_everything(tmp_path, chain, qemu_img, qemu_io):
    m = stratad(tmp_path)
    for c, a in by_name_sequence(chain):
        m.ok(c, **a)
    r = run(qemu_io, "-f", "qcow2", "-c", "write 0 4k", chain["base"],
            check=False)
    assert r.returncode != 0 and "lock" in (r.stderr + r.stdout)
    assert m.stop() == 0
    for n in ("base", "mid", "top"):
        run(qemu_img, "check", chain[n])
        run(qemu_io, "-f", "qcow2", "-c", "write 0 4k", chain[n])
