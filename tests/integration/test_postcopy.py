"""The post-copy migration recipe from the README, end to end.

The source serves the disk read-only over NBD (strata-nbd, or qemu-nbd as a
peer); the destination creates an overlay whose backing file is the export,
opens it in stratad under a copy-on-read filter, serves it to the "guest"
over NBD and pulls the rest with `strata pull`.  Guest reads and writes go
on meanwhile.  At the end the overlay has no backing file, passes
qemu-img check and reads the same as the source with the guest's writes;
what the guest read before the pull was already copied by copy-on-read.
"""
import json
import subprocess

import pytest

from harness import binary, need, run, spawn, wait_for_path


def qemu_img():
    return need("qemu-img", "qemu-utils")


def qemu_io():
    return need("qemu-io", "qemu-utils")


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.stderr:
            proc.stderr.close()


def source_image(tmp):
    src = tmp / "src.qcow2"
    run(qemu_img(), "create", "-q", "-f", "qcow2", str(src), "64M")
    run(qemu_io(), "-c", "write -P 0x61 0 8M", "-c", "write -z 8M 8M",
        "-c", "write -P 0x62 40M 4M", "-c", "write -P 0x63 63M 1M", str(src))
    return src


def serve_source(tmp, src, peer):
    sock = str(tmp / "src.sock")
    if peer == "strata-nbd":
        argv = [binary("strata-nbd"), "-f", "qcow2", "-r", "-x", "disk",
                "-k", sock, "-t", "-e", "8", str(src)]
    else:
        argv = [need("qemu-nbd", "qemu-utils"), "-f", "qcow2", "-r", "-x",
                "disk", "-k", sock, "-t", "-e", "8", str(src)]
    proc = spawn(argv, stderr=subprocess.PIPE, text=True)
    wait_for_path(sock, proc, peer)
    return proc, f"nbd+unix:///disk?socket={sock}"


@pytest.mark.parametrize("peer", ["strata-nbd", "qemu-nbd"])
def test_postcopy_recipe(tmp_path, peer):
    src = source_image(tmp_path)
    source, src_uri = serve_source(tmp_path, src, peer)
    dest = tmp_path / "dest.qcow2"
    qmp = str(tmp_path / "qmp.sock")
    nbd = str(tmp_path / "dst.sock")
    guest = f"nbd+unix:///disk?socket={nbd}"
    daemon = None
    try:
        run(binary("strata-img"), "create", "-q", "-f", "qcow2", "-b",
            src_uri, "-F", "raw", str(dest))
        daemon = spawn(
            [binary("stratad"), "--qmp", qmp, "--blockdev",
             f"driver=qcow2,node-name=disk,file.driver=file,"
             f"file.filename={dest}",
             "--blockdev", "driver=copy-on-read,node-name=cor,file=disk",
             "--nbd-server", f"addr.type=unix,addr.path={nbd}",
             "--export", "nbd,id=e0,node-name=cor,name=disk,writable=on"],
            stderr=subprocess.PIPE, text=True)
        wait_for_path(qmp, daemon, "stratad")
        wait_for_path(nbd, daemon, "stratad")

        # The guest reads (copy-on-read fetches) and writes.
        r = run(qemu_io(), "-f", "raw", "-c", "read -P 0x61 0 1M",
                "-c", "write -P 0x77 20M 1M", "-c", "read -P 0x62 40M 64k",
                guest)
        assert "Pattern verification failed" not in r.stdout
        # What it read is in the overlay now, before any pull.
        top_only = "json:" + json.dumps({
            "driver": "qcow2", "backing": None,
            "file": {"driver": "file", "filename": str(dest)}})
        m = json.loads(run(qemu_img(), "map", "-U", "--output=json",
                           top_only).stdout)
        local = [e for e in m if e["depth"] == 0 and e["data"]]
        covered = lambda off: any(e["start"] <= off < e["start"] + e["length"]
                                  for e in local)
        assert covered(0) and covered(20 << 20) and covered(40 << 20)
        assert not covered(63 << 20)

        # Pull the rest while the guest keeps writing.
        pull = spawn(
            [binary("strata"), "--socket", qmp, "pull", "disk", "--wait",
             "--verbose", "--bandwidth", "32"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        run(qemu_io(), "-f", "raw", "-c", "write -P 0x78 50M 2M", guest)
        out, err = pull.communicate(timeout=120)
        assert pull.returncode == 0, err
        assert out.strip().splitlines()[-1] == "Pull complete"
        assert stop(daemon) == 0
        daemon = None
    finally:
        if daemon:
            stop(daemon)
        stop(source)

    # Independent, consistent, and the source's content plus the writes.
    info = json.loads(run(qemu_img(), "info", "--output=json",
                          str(dest)).stdout)
    assert "backing-filename" not in info
    run(qemu_img(), "check", str(dest))
    expect = tmp_path / "expect.qcow2"
    run(qemu_img(), "convert", "-O", "qcow2", str(src), str(expect))
    run(qemu_io(), "-c", "write -P 0x77 20M 1M", "-c", "write -P 0x78 50M 2M",
        str(expect))
    run(qemu_img(), "compare", str(dest), str(expect))
    # The zero region stayed zero clusters: no data was written for it.
    m = json.loads(run(qemu_img(), "map", "--output=json", str(dest)).stdout)
    zeroed = [e for e in m
              if e["start"] < (16 << 20) and e["start"] + e["length"] > (8 << 20)]
    assert zeroed, m
    for e in zeroed:
        assert e["zero"] and not e["data"] and e["depth"] == 0, e
