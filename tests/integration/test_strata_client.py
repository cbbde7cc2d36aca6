"""The strata client against stratad: the clear message when no daemon
listens, raw, --json, events, and the block commands (nodes tree, add,
del) on a qcow2 chain."""
import os
import signal
import subprocess

import pytest

from harness import binary, run, spawn, wait_until
from harness import QMP
from harness.daemons import start_qmp as start
from harness.procs import stop


@pytest.fixture
def daemon(tmp_path):
    sock = str(tmp_path / "d.sock")
    proc = start([binary("stratad"), "--qmp", sock], sock)
    yield sock
    stop(proc)


def strata(*args, check=True, **kw):
    return run(binary("strata"), *args, check=check, timeout=20, **kw)


def test_no_daemon(tmp_path):
    path = tmp_path / "nobody.sock"
    p = strata("--socket", path, "nodes", check=False)
    assert p.returncode == 1
    assert p.stderr == (f"strata: no daemon is listening on {path} (start "
                        "stratad, or set --socket / STRATA_SOCKET)\n")
    env = dict(os.environ, STRATA_SOCKET=str(path))
    p = strata("raw", '{"execute": "query-version"}', check=False, env=env)
    assert p.returncode == 1 and str(path) in p.stderr


def test_raw_and_json(daemon):
    p = strata("--socket", daemon, "--json", "raw",
               '{"execute": "query-version"}')
    assert p.stdout == ('{"return":{"qemu":{"micro":0,"minor":1,"major":0},'
                        '"package":"strata-0.1.0"}}\n')
    p = strata("--socket", daemon, "raw", '{"execute": "nope"}', check=False)
    assert p.returncode == 1
    assert p.stderr == "strata: The command nope has not been found\n"
    env = dict(os.environ, STRATA_SOCKET=daemon)
    p = strata("--json", "nodes", env=env)
    assert p.stdout == "[]\n"


def test_events(tmp_path):
    sock = str(tmp_path / "e.sock")
    proc = start([binary("stratad"), "--qmp", sock], sock)
    try:
        ev = spawn([binary("strata"), "--socket", sock, "--json",
                               "events"], stdout=subprocess.PIPE, text=True)
        human = spawn([binary("strata"), "--socket", sock,
                                  "events"], stdout=subprocess.PIPE,
                                 text=True)
        # Both have negotiated once they catch SIGINT (set after connecting).
        for p in (ev, human):
            wait_until(lambda: catches(p.pid, signal.SIGINT),
                       what="strata events to connect")
        strata("--socket", sock, "raw", '{"execute": "quit"}')
        out, _ = ev.communicate(timeout=10)
        hout, _ = human.communicate(timeout=10)
        assert ev.returncode == 0 and human.returncode == 0
        import json
        e = json.loads(out.splitlines()[0])
        assert e["event"] == "SHUTDOWN"
        assert e["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert hout.split(" ", 2)[2] == (
            'SHUTDOWN {"guest":false,"reason":"host-qmp-quit"}\n')
        assert proc.wait(timeout=10) == 0
    finally:
        stop(proc)


def catches(pid, sig):
    """Whether process PID has a handler installed for signal SIG."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_events_sigint(daemon):
    ev = spawn([binary("strata"), "--socket", daemon, "events"],
                          stdout=subprocess.PIPE, text=True)
    # SIGINT before the client has installed its handler would kill it
    # by the default action: wait until its handler is in place (the
    # kernel's SigCgt mask), however slowly the machine starts it.
    wait_until(lambda: catches(ev.pid, signal.SIGINT),
               what="strata events to catch SIGINT")
    ev.send_signal(signal.SIGINT)
    ev.communicate(timeout=10)
    assert ev.returncode == 0


def test_nodes_add_del(tmp_path):
    simg = binary("strata-img")
    run(simg, "create", "-f", "qcow2", tmp_path / "base.qcow2", "64M")
    run(simg, "create", "-f", "qcow2", "-b", tmp_path / "base.qcow2",
        "-F", "qcow2", tmp_path / "overlay.qcow2")
    sock = str(tmp_path / "n.sock")
    proc = start([binary("stratad"), "--qmp", sock,
                  "--blockdev", "driver=file,node-name=base-file,"
                  f"filename={tmp_path}/base.qcow2",
                  "--blockdev", "driver=qcow2,node-name=base,file=base-file",
                  "--blockdev", "driver=file,node-name=top-file,"
                  f"filename={tmp_path}/overlay.qcow2",
                  "--blockdev", '{"driver": "qcow2", "node-name": "top", '
                  '"file": "top-file", "backing": "base"}'], sock)
    try:
        p = strata("--socket", sock, "nodes")
        lines = p.stdout.splitlines()
        assert lines[0].startswith(f"top  qcow2  {tmp_path}/overlay.qcow2")
        assert lines[0].endswith("(64 MiB)")
        assert lines[1].startswith(
            f"    file: top-file  file  {tmp_path}/overlay.qcow2")
        assert lines[2].startswith(
            f"    backing: base  qcow2  {tmp_path}/base.qcow2")
        assert lines[3].startswith(
            f"        file: base-file  file  {tmp_path}/base.qcow2")
        assert len(lines) == 4
        p = strata("--socket", sock, "--json", "nodes")
        import json
        names = {n["node-name"] for n in json.loads(p.stdout)}
        assert names == {"top", "top-file", "base", "base-file"}

        run("truncate", "-s", "1M", tmp_path / "extra.raw")
        p = strata("--socket", sock, "add", "driver=raw", "node-name=extra",
                   "file.driver=file", f"file.filename={tmp_path}/extra.raw")
        assert p.stdout == "added extra\n"
        with QMP(sock) as q:
            got = {n["node-name"]: n for n in
                   q.execute("query-named-block-nodes")}
            assert got["extra"]["drv"] == "raw"
            assert got["extra"]["image"]["virtual-size"] == 1 << 20
        p = strata("--socket", sock, "nodes")
        assert "extra  raw" in p.stdout
        p = strata("--socket", sock, "add", "driver=raw", "node-name=extra",
                   "file.driver=file", f"file.filename={tmp_path}/extra.raw",
                   check=False)
        assert p.returncode == 1 and p.stderr.startswith("strata: ")
        strata("--socket", sock, "del", "extra")
        p = strata("--socket", sock, "del", "extra", check=False)
        assert p.returncode == 1
        assert "extra" in p.stderr
    finally:
        stop(proc)


def test_snapshot_on_a_chain_opened_by_reference(tmp_path):
    """strata snapshot puts a new qcow2 overlay on top of a node whose
    backing was given by node name (so its displayed filename is a
    json:{...} description): the overlay records the image's own path,
    and QEMU sees the three-layer chain after the daemon stops."""
    simg = binary("strata-img")
    run(simg, "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "16M")
    run(simg, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
        "qcow2", tmp_path / "top.qcow2")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 1M",
        tmp_path / "top.qcow2")
    sock = str(tmp_path / "s.sock")
    proc = start([binary("stratad"), "--qmp", sock,
                  "--blockdev", "driver=file,node-name=base-file,"
                  f"filename={tmp_path}/base.qcow2",
                  "--blockdev", "driver=qcow2,node-name=base,file=base-file",
                  "--blockdev", "driver=file,node-name=top-file,"
                  f"filename={tmp_path}/top.qcow2",
                  "--blockdev", '{"driver": "qcow2", "node-name": "top", '
                  '"file": "top-file", "backing": "base"}'], sock)
    try:
        p = strata("--socket", sock, "snapshot", "top",
                   str(tmp_path / "snap.qcow2"), "--node-name", "snap")
        assert p.returncode == 0, p.stderr
        lines = strata("--socket", sock, "nodes").stdout.splitlines()
        assert lines[0].startswith(f"snap  qcow2  {tmp_path}/snap.qcow2")
        assert any(l.startswith("    backing: top  qcow2") for l in lines)
    finally:
        stop(proc)
    info = run("qemu-img", "info", "--backing-chain", "--output=json",
               tmp_path / "snap.qcow2").stdout
    import json
    chain = json.loads(info)
    assert [os.path.basename(i["filename"]) for i in chain] == \
        ["snap.qcow2", "top.qcow2", "base.qcow2"]
    assert chain[0]["backing-filename-format"] == "qcow2"
    run("qemu-img", "check", tmp_path / "snap.qcow2")
    p = run("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 3 0 1M",
            tmp_path / "snap.qcow2")
    assert "Pattern verification failed" not in p.stdout
