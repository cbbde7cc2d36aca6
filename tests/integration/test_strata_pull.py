"""The people's interface to block jobs: strata pull, jobs and job, modelled
on virsh blockpull/blockjob.

Against real daemons (qemu-storage-daemon, and stratad once it has
block-stream) the jobs run on a qcow2 chain base <- mid <- top, rate
limited so that they last long enough to be watched, interrupted or
aborted; qemu-img is the oracle for what the pull did to the image.  A
scripted QMP peer (FakeDaemon) drives the cases a real daemon cannot be
made to produce on cue: a job whose length is 0 at first, a cancel that
does not end the job, a job that fails."""
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import threading

import pytest

from harness import binary, need, run, spawn, wait_until
from harness import QMP
from harness.daemons import start_qmp as start
from harness.procs import stop

MiB = 1 << 20
SIZE = 64 * MiB
BASE_DATA = 8 * MiB            # what a pull copies, at 1 MiB/s: 8 s
LINE_RE = re.compile(r"^Block Pull: \[[ 0-9]{1,2}[0-9]\.[0-9]{2} %\]$")


def strata(sock, *args, check=False, **kw):
    return run(binary("strata"), "--socket", sock, *args, check=check,
               timeout=30, **kw)


def percent(line):
    return float(line.split("[")[1].split("%")[0])


# ---- real daemons -------------------------------------------------------

@pytest.fixture
def chain(tmp_path):
    """base <- mid <- top, 64 MiB, each layer with data of its own; and
    expected.raw, what a guest sees through top."""
    img = need("qemu-img", "qemu-utils")
    qio = need("qemu-io", "qemu-utils")
    run(img, "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", SIZE)
    run(qio, "-f", "qcow2", "-c", f"write -P 0x11 0 {BASE_DATA}",
        tmp_path / "base.qcow2")
    run(img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
        "qcow2", tmp_path / "mid.qcow2")
    run(qio, "-f", "qcow2", "-c", f"write -P 0x33 {BASE_DATA} 1M",
        tmp_path / "mid.qcow2")
    run(img, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F",
        "qcow2", tmp_path / "top.qcow2")
    run(qio, "-f", "qcow2", "-c", "write -P 0x22 60M 1M",
        tmp_path / "top.qcow2")
    run(img, "convert", "-O", "raw", tmp_path / "top.qcow2",
        tmp_path / "expected.raw")
    return tmp_path


def blockdevs(d):
    args = []
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        args += ["--blockdev", f"driver=file,node-name={name}-file,"
                 f"filename={d}/{name}.qcow2"]
        node = {"driver": "qcow2", "node-name": name,
                "file": f"{name}-file"}
        if backing:
            node["backing"] = backing
        args += ["--blockdev", json.dumps(node)]
    return args


@pytest.fixture(params=["qsd", "stratad"])
def daemon(request, chain):
    """The socket of a daemon that has the chain open."""
    sock = str(chain / "d.sock")
    if request.param == "qsd":
        argv = [need("qemu-storage-daemon", "qemu-system-common"),
                "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                "--monitor", "chardev=m"]
    else:
        argv = [binary("stratad"), "--qmp", sock]
    proc = start(argv + blockdevs(chain), sock)
    try:
        with QMP(sock) as q:
            names = {c["name"] for c in q.execute("query-commands")}
        if request.param == "stratad" and "block-stream" not in names:
            pytest.skip("stratad has no block-stream yet (query-commands)")
        yield sock
    finally:
        stop(proc)


def jobs(sock):
    with QMP(sock) as q:
        return q.execute("query-block-jobs")


def backing(path):
    info = json.loads(run("qemu-img", "info", "-U", "--output=json",
                          path).stdout)
    name = info.get("backing-filename")
    return name and os.path.basename(name)


def stopped(sock, chain):
    """Stop the daemon by QMP quit, so that qemu-img may open the images."""
    with QMP(sock) as q:
        q.execute("quit")
    wait_until(lambda: not os.path.exists(sock), 10, 0.05,
               what=f"the daemon to remove {sock}")
    return chain


def test_pull_with_base_waits_and_shows_progress(daemon, chain):
    """pull --base --wait --verbose off a terminal: virsh's progress lines
    on stderr, rising to 100, then "Pull complete"; top now backs onto base
    and holds mid's data, and the guest sees the same bytes."""
    p = strata(daemon, "pull", "top", "--base", "base", "--wait",
               "--verbose", "--bandwidth", "4")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "Pull complete\n"
    lines = p.stderr.splitlines()
    assert lines and all(LINE_RE.match(line) for line in lines), lines
    values = [percent(line) for line in lines]
    assert values == sorted(values) and values[-1] == 100.0
    assert jobs(daemon) == []
    stopped(daemon, chain)
    assert backing(chain / "top.qcow2") == "base.qcow2"
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
        chain / "expected.raw", chain / "top.qcow2")
    run("qemu-img", "check", chain / "top.qcow2")


def test_pull_whole_chain(daemon, chain):
    p = strata(daemon, "pull", "top", "--wait")
    assert (p.returncode, p.stdout, p.stderr) == (0, "Pull complete\n", "")
    stopped(daemon, chain)
    assert backing(chain / "top.qcow2") is None
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
        chain / "expected.raw", chain / "top.qcow2")


def test_started_jobs_and_job(daemon, chain):
    """Without --wait the job runs on: 'jobs' lists it with its real
    length, 'job' shows and changes its speed, 'job --abort' ends it."""
    p = strata(daemon, "pull", "top", "--bandwidth", "1")
    assert (p.returncode, p.stdout) == (0, "Block Pull started\n"), p.stderr
    [job] = json.loads(strata(daemon, "--json", "jobs").stdout)
    assert (job["device"], job["type"], job["speed"]) == ("top", "stream",
                                                          MiB)
    assert job["len"] == SIZE
    table = strata(daemon, "jobs").stdout.splitlines()
    assert table[0].split() == ["ID", "TYPE", "STATUS", "DONE",
                                "OFFSET/LENGTH", "SPEED"]
    row = table[1].split()
    assert row[:3] == ["top", "stream", "running"] and len(table) == 2
    assert table[1].endswith("  1 MiB/s")

    p = strata(daemon, "job", "top", "--info")
    assert re.fullmatch(r"Block Pull: \[[ 0-9]{1,2}[0-9]\.[0-9]{2} %\]    "
                        r"Bandwidth limit: 1048576 bytes/s "
                        r"\(1\.000 MiB/s\)\n", p.stdout), p.stdout
    assert re.fullmatch(r"Block Pull: \[[ 0-9.]+ %\]    Bandwidth limit: "
                        r"1048576 bytes/s \(1\.000 MiB/s\)\n",
                        strata(daemon, "job", "top").stdout)
    assert strata(daemon, "job", "top", "--bandwidth", "512K").returncode == 0
    assert jobs(daemon)[0]["speed"] == 512 * 1024
    assert strata(daemon, "job", "top", "--bandwidth", "3",
                  "--bytes").returncode == 0
    assert jobs(daemon)[0]["speed"] == 3
    assert "Bandwidth limit: 3 bytes/s (3.000 B/s)" in strata(
        daemon, "job", "top").stdout

    p = strata(daemon, "job", "top", "--abort")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert jobs(daemon) == []          # --abort waited for the end
    assert strata(daemon, "job", "top").stdout == \
        "No current block job for top\n"
    assert strata(daemon, "jobs").stdout == "no block jobs\n"
    p = strata(daemon, "job", "top", "--abort")
    assert p.returncode == 1 and p.stderr.startswith("strata: ")
    assert "top" in p.stderr and len(p.stderr.splitlines()) == 1
    stopped(daemon, chain)
    assert backing(chain / "top.qcow2") == "mid.qcow2"


def wait_for_progress(stream):
    """Read STREAM's lines until one shows a known length."""
    while True:
        line = stream.readline()
        assert line, "the client ended before showing progress"
        if LINE_RE.match(line.rstrip("\n")):
            return line


def test_sigint_aborts_the_job(daemon, chain):
    proc = spawn([binary("strata"), "--socket", daemon, "pull",
                             "top", "--bandwidth", "1", "--wait",
                             "--verbose"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_progress(proc.stderr)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, out) == (1, "Pull aborted\n")
    assert "100.00" not in err
    assert jobs(daemon) == []
    stopped(daemon, chain)
    assert backing(chain / "top.qcow2") == "mid.qcow2"
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
        chain / "expected.raw", chain / "top.qcow2")


@pytest.mark.parametrize("async_", [False, True])
def test_timeout_aborts_the_job(daemon, chain, async_):
    p = strata(daemon, "pull", "top", "--bandwidth", "1", "--wait",
               "--timeout", "1", *(["--async"] if async_ else []))
    assert (p.returncode, p.stdout) == (1, "Pull aborted\n"), p.stderr
    if not async_:
        assert jobs(daemon) == []
    wait_until(lambda: not jobs(daemon), 10, 0.1,
               what="the job list to empty")
    assert jobs(daemon) == []
    stopped(daemon, chain)
    assert backing(chain / "top.qcow2") == "mid.qcow2"


def test_progress_bar_on_a_terminal(daemon, chain):
    """On a terminal --verbose draws one bar, redrawn in place with \\r,
    with the percentage, the rate and the time left."""
    master, slave = pty.openpty()
    proc = spawn([binary("strata"), "--socket", daemon, "pull",
                             "top", "--bandwidth", "4", "--wait",
                             "--verbose"], stdin=slave, stdout=slave,
                            stderr=slave)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, f"no output from the client: {out!r}"
            try:
                data = os.read(master, 4096)
            except OSError:         # EIO: the client closed the terminal
                break
            if not data:
                break
            out += data
        assert proc.wait(timeout=10) == 0
    finally:
        os.close(master)
        proc.kill()
        proc.wait()
    text = out.decode()
    bars = re.findall(r"\rBlock Pull: \[(#*) *\] +([0-9.]+) %  +(\S+ \S+/s) "
                      r"+(\S+) left\x1b\[K", text)
    assert len(bars) >= 2, repr(text)
    assert bars[-1][1] == "100.00" and bars[-1][0] and \
        set(bars[-1][0]) == {"#"}
    assert any(re.fullmatch(r"[0-9.]+ [KMG]iB/s", rate)
               and re.fullmatch(r"[0-9]+:[0-9]{2}:[0-9]{2}", left)
               for _, _, rate, left in bars), bars
    # every bar on the one line: the only newlines end it and the message
    assert text[text.index("\rBlock Pull"):].count("\n") == 2, repr(text)
    assert text.endswith("\r\nPull complete\r\n"), repr(text[-80:])


def test_unknown_node(daemon):
    with QMP(daemon) as q:
        reply = q.cmd("block-stream", {"job-id": "nonode",
                                       "device": "nonode"})
    p = strata(daemon, "pull", "nonode", "--wait")
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == f"strata: {reply['error']['desc']}\n"


# ---- a scripted peer ----------------------------------------------------

class FakeDaemon:
    """A QMP peer on a unix socket that records every command and answers
    through SCRIPT(fake, command, arguments) -> (return value or an
    {"error": ...} dict, [events sent before the reply])."""

    def __init__(self, path, script):
        self.path = str(path)
        self.script = script
        self.commands = []
        self.state = {}
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(4)
        self.srv.settimeout(0.2)
        self.done = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def close(self):
        self.done = True
        self.thread.join(10)
        self.srv.close()

    def serve(self):
        while not self.done:
            try:
                conn, _ = self.srv.accept()
            except socket.timeout:
                continue
            with conn:
                self.converse(conn)

    def send(self, conn, msg):
        conn.sendall(json.dumps(msg).encode() + b"\r\n")

    def converse(self, conn):
        self.send(conn, {"QMP": {"version": {}, "capabilities": []}})
        buf, dec = "", json.JSONDecoder()
        conn.settimeout(0.2)
        while not self.done:
            try:
                data = conn.recv(4096)
            except socket.timeout:
                continue
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                name, args = msg["execute"], msg.get("arguments", {})
                self.commands.append((name, args))
                if name == "qmp_capabilities":
                    ret, events = {}, []
                else:
                    ret, events = self.script(self, name, args)
                for ev in events:
                    self.send(conn, {"event": ev[0], "data": ev[1],
                                     "timestamp": {"seconds": 0,
                                                   "microseconds": 0}})
                reply = ret if "error" in ret else {"return": ret}
                self.send(conn, dict(reply, id=msg.get("id")))

    def names(self):
        return [c[0] for c in self.commands]


@pytest.fixture
def fake(tmp_path):
    daemons = []

    def make(script):
        d = FakeDaemon(tmp_path / f"fake{len(daemons)}.sock", script)
        daemons.append(d)
        return d
    yield make
    for d in daemons:
        d.close()


def job(offset, length, speed=0):
    return {"device": "top", "type": "stream", "len": length,
            "offset": offset, "speed": speed, "busy": True,
            "paused": False, "ready": False, "status": "running",
            "io-status": "ok", "auto-finalize": True, "auto-dismiss": True}


def end_event(name, length, offset, **extra):
    return (name, dict({"device": "top", "type": "stream", "len": length,
                        "offset": offset, "speed": 0}, **extra))


def test_length_unknown_at_first(fake):
    """The first queries say len 0: no percentage is printed until the
    length is known, and never a misleading 100; 100 is printed once."""
    def script(d, name, args):
        n = d.state["queries"] = d.state.get("queries", 0) + (
            name == "query-block-jobs")
        if name == "block-stream":
            return {}, []
        if n <= 2:
            return [job(0, 0)], []
        if n == 3:
            return [job(50, 100)], []
        if n == 4:
            return [dict(job(100, 100), status="concluded")], []
        return [], [end_event("BLOCK_JOB_COMPLETED", 100, 100)]
    d = fake(script)
    p = strata(d.path, "pull", "top", "--wait", "--verbose", "--bandwidth",
               "3")
    assert (p.returncode, p.stdout) == (0, "Pull complete\n")
    assert p.stderr == "Block Pull: [50.00 %]\nBlock Pull: [100.00 %]\n"
    assert d.commands[1] == ("block-stream", {"job-id": "top",
                                              "device": "top",
                                              "speed": 3 * MiB})


def test_failed_job(fake):
    def script(d, name, args):
        if name == "block-stream":
            return {}, [("BLOCK_JOB_ERROR", {"device": "top",
                                             "operation": "read",
                                             "action": "report"}),
                        end_event("BLOCK_JOB_COMPLETED", 100, 10,
                                  error="Input/output error")]
        return [], []
    d = fake(script)
    p = strata(d.path, "pull", "top", "--wait")
    assert (p.returncode, p.stdout) == (1, "Pull failed\n")
    assert p.stderr == "strata: top: Input/output error\n"


def test_job_gone_without_an_event(fake):
    """A daemon that sends no events: the job's disappearance ends it."""
    def script(d, name, args):
        n = d.state["queries"] = d.state.get("queries", 0) + (
            name == "query-block-jobs")
        return ({} if name == "block-stream"
                else [job(10, 100)] if n == 1 else []), []
    d = fake(script)
    p = strata(d.path, "pull", "top", "--wait")
    assert (p.returncode, p.stdout) == (0, "Pull complete\n")


def cancel_script(d, name, args):
    """A job that a cancel ends only three queries later."""
    if name == "block-stream":
        return {}, []
    if name == "block-job-cancel":
        d.state["cancelled"] = 0
        return {}, []
    if "cancelled" in d.state:
        d.state["cancelled"] += 1
        if d.state["cancelled"] >= 3:
            return [], [end_event("BLOCK_JOB_CANCELLED", 100, 10)]
    return [job(10, 100)], []


@pytest.mark.parametrize("async_", [False, True])
def test_timeout_waits_for_the_cancel_unless_async(fake, async_):
    d = fake(cancel_script)
    p = strata(d.path, "pull", "top", "--wait", "--timeout", "1",
               *(["--async"] if async_ else []))
    assert (p.returncode, p.stdout) == (1, "Pull aborted\n")
    after = d.names()[d.names().index("block-job-cancel") + 1:]
    if async_:
        assert after == []
    else:
        assert after == ["query-block-jobs"] * 3


@pytest.mark.parametrize("async_", [False, True])
def test_job_abort_waits_unless_async(fake, async_):
    d = fake(cancel_script)
    p = strata(d.path, "job", "top", "--abort",
               *(["--async"] if async_ else []))
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert d.commands[1] == ("block-job-cancel", {"device": "top"})
    assert d.names()[2:] == ([] if async_ else ["query-block-jobs"] * 3)


@pytest.mark.parametrize("cmd", [["pull", "top"], ["job", "top"]])
@pytest.mark.parametrize("rate,why", [
    ("abc", "is not a rate"),
    ("", "is not a rate"),
    ("1.5", "has an unknown unit"),
    ("-5", "must not be negative"),
    ("5KB", "has an unknown unit"),
    ("99999999999999999999", "is out of range"),
    ("8796093022208", "is out of range"),   # 2^43 MiB/s = 2^63 bytes/s
    ("8E", "is out of range"),
])
def test_bad_rate(fake, cmd, rate, why):
    """A bad RATE is a one-line error and nothing reaches the daemon."""
    d = fake(lambda d, name, args: ({}, []))
    p = strata(d.path, *cmd, "--bandwidth", rate)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == (f"strata: {cmd[0]}: bandwidth '{rate}' {why}"
                        + p.stderr.split(why, 1)[1])
    assert len(p.stderr.splitlines()) == 1
    assert d.names() == ["qmp_capabilities"]


@pytest.mark.parametrize("rate,extra,speed", [
    ("2", [], 2 * MiB), ("2", ["--bytes"], 2), ("500K", [], 500 << 10),
    ("50M", ["--bytes"], 50 * MiB), ("1G", [], 1 << 30),
    ("3MiB", [], 3 * MiB), ("7B", [], 7), ("0", [], None),
])
def test_rates(fake, rate, extra, speed):
    d = fake(lambda d, name, args: ({}, []))
    p = strata(d.path, "pull", "top", "--bandwidth", rate, *extra)
    assert (p.returncode, p.stdout) == (0, "Block Pull started\n")
    assert d.commands[1][1].get("speed") == speed


@pytest.mark.parametrize("args,msg", [
    (["--verbose"], "pull: --verbose needs --wait"),
    (["--async"], "pull: --async needs --wait"),
    (["--timeout", "5"], "pull: --timeout needs --wait"),
    (["--bytes"], "pull: --bytes needs --bandwidth"),
    (["--wait", "--timeout", "0"],
     "pull: timeout '0' is not a positive number of seconds"),
    (["--wait", "--timeout", "x"],
     "pull: timeout 'x' is not a positive number of seconds"),
])
def test_bad_options(fake, args, msg):
    d = fake(lambda d, name, args: ({}, []))
    p = strata(d.path, "pull", "top", *args)
    assert (p.returncode, p.stderr) == (1, f"strata: {msg}\n")
    assert d.names() == ["qmp_capabilities"]


def test_second_sigint_stops_waiting(fake):
    """Ctrl-C cancels and waits; a daemon slow to end the job can be left
    with a second Ctrl-C."""
    def script(d, name, args):
        return ({} if name in ("block-stream", "block-job-cancel")
                else [job(10, 100)]), []
    d = fake(script)
    proc = spawn([binary("strata"), "--socket", d.path, "pull",
                             "top", "--wait"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for signals in (1, 2):

            def polled():
                assert proc.poll() is None
                return "query-block-jobs" in d.names()
            wait_until(polled, 30, 0.05,
                       what="strata to poll query-block-jobs")
            proc.send_signal(signal.SIGINT)
            if signals == 1:

                def cancelled():
                    assert proc.poll() is None
                    return "block-job-cancel" in d.names()
                wait_until(cancelled, 10, 0.05,
                           what="strata to send block-job-cancel")
                assert proc.poll() is None      # waiting for the end
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, out, err) == (1, "Pull aborted\n", "")
    assert d.names().count("block-job-cancel") == 1


def test_jobs_and_job_output(fake):
    """The table, virsh's --info line, and --json, for a job whose length
    is not known yet (no percentage) and one with a limit."""
    jobs_ = [job(0, 0), dict(job(3 * MiB, 8 * MiB, 2 * MiB), device="a-much"
                             "-longer-id")]
    d = fake(lambda d, name, args: (jobs_, []))
    assert strata(d.path, "jobs").stdout.splitlines() == [
        "ID                TYPE      STATUS         DONE  OFFSET/LENGTH"
        "             SPEED",
        "top               stream    running           -  0 B / 0 B     "
        "            unlimited",
        "a-much-longer-id  stream    running     37.50 %  3 MiB / 8 MiB "
        "            2 MiB/s"]
    assert json.loads(strata(d.path, "--json", "jobs").stdout) == jobs_
    assert strata(d.path, "job", "top").stdout == "Block Pull: [ 0.00 %]\n"
    assert strata(d.path, "job", "a-much-longer-id", "--info").stdout == (
        "Block Pull: [37.50 %]    Bandwidth limit: 2097152 bytes/s "
        "(2.000 MiB/s)\n")
    assert json.loads(strata(d.path, "--json", "job", "top").stdout) == \
        jobs_[0]
    assert strata(d.path, "--json", "job", "nope").stdout == "null\n"
