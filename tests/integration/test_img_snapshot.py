"""strata-img snapshot (and info's snapshot list) against qemu-img 7.2.

Snapshots made by strata are listed, applied and read by qemu-img and
qemu-io; snapshots made by qemu-img are listed, applied and deleted by
strata-img.  After every change qemu-img check must find nothing, and the
guest data is read back with 'read -P' against a model.  Listings are
compared byte for byte (both tools read the same table, so even the dates
agree); bad input must give qemu-img's message and exit code and leave the
file untouched.
"""
import json
import shutil
import struct

import pytest

from harness import binary, file_state, run
from harness.crash import build_shim, crash_env
from harness.qcow2 import (KiB, MiB, Model, check_reads, create, header,
                           patch, qemu_check, qemu_img, qio, sio)


def simg(*args, cwd=None, check=True):
    return run(binary("strata-img"), *args, cwd=cwd, check=check)


def qimg(*args, cwd=None, check=True):
    return run(qemu_img(), *args, cwd=cwd, check=check)


def same_output(args, cwd, rc=None):
    """Both tools give the same stdout, exit code and stderr (progname
    aside); returns qemu-img's process."""
    q = qimg(*args, cwd=cwd, check=False)
    s = simg(*args, cwd=cwd, check=False)
    msg = f"qemu-img:\n{q.stdout}{q.stderr}\nstrata-img:\n{s.stdout}{s.stderr}"
    assert s.returncode == q.returncode, msg
    if rc is not None:
        assert q.returncode == rc, msg
    assert s.stdout == q.stdout, msg
    assert (s.stderr.replace("strata-img", "qemu-img")
            == q.stderr), msg
    return q


def table(path):
    """[(l1_offset, l1_size, id, name, disk_size)] from the image."""
    h = header(path)
    data = open(path, "rb").read()
    off, out = h["snapshots_offset"], []
    for _ in range(h["nb_snapshots"]):
        (l1o, l1s, idl, nl, _ds, _dn, _vc, _vs,
         extra) = struct.unpack(">QIHHIIQII", data[off:off + 40])
        e = data[off + 40:off + 40 + extra]
        p = off + 40 + extra
        disk = struct.unpack(">Q", e[8:16])[0] if extra >= 16 else None
        out.append((l1o, l1s, data[p:p + idl].decode(),
                    data[p + idl:p + idl + nl].decode(), disk))
        off += (40 + extra + idl + nl + 7) & ~7
    return out


def listings_agree(img):
    same_output(["snapshot", "-l", img.name], img.parent, rc=0)
    same_output(["info", img.name], img.parent, rc=0)
    q = same_output(["info", "--output=json", img.name], img.parent, rc=0)
    return json.loads(q.stdout)


def populate(img, model):
    qio(img, [model.write(0, 1 * MiB, 0x11), model.write(5 * MiB, 64 * KiB,
                                                         0x22),
              model.write(9 * MiB + 512, 4 * KiB, 0x23)])


# ---- listing ---------------------------------------------------------------

def test_list_and_info_match_qemu(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, 16 * MiB)
    populate(img, Model(16 * MiB))
    same_output(["snapshot", "-l", img.name], tmp_path, rc=0)  # none: empty
    for name in ("first", "a-much-longer-snapshot-name", "1"):
        qimg("snapshot", "-c", name, img.name, cwd=tmp_path)
    info = listings_agree(img)
    assert [s["name"] for s in info["snapshots"]] == [
        "first", "a-much-longer-snapshot-name", "1"]
    # VM state, a VM clock over 100 hours and no icount (all ones): the
    # columns and the JSON members qemu-img prints for them.
    off = header(img)["snapshots_offset"]
    patch(img, off + 24, ">QI", 370000 * 10**9 + 3725123456789, 1572864)
    patch(img, off + 40, ">Q", 1572864)
    patch(img, off + 56, ">Q", 2**64 - 1)
    info = listings_agree(img)
    assert "icount" not in info["snapshots"][0]
    assert info["snapshots"][1]["icount"] == 0


def test_list_on_backed_image_and_v2(tmp_path):
    base = tmp_path / "base.qcow2"
    create(base, 4 * MiB)
    top = tmp_path / "top.qcow2"
    create(top, 4 * MiB, backing="base.qcow2")
    v2 = tmp_path / "v2.qcow2"
    create(v2, 4 * MiB, compat="0.10")
    for img in (top, v2):
        simg("snapshot", "-c", "s", img.name, cwd=tmp_path)
        listings_agree(img)
        qemu_check(img)


# ---- create ----------------------------------------------------------------

def test_strata_snapshots_are_qemu_snapshots(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, 16 * MiB)
    m0 = Model(16 * MiB)
    populate(img, m0)
    simg("snapshot", "-c", "s1", img.name, cwd=tmp_path)
    qemu_check(img)
    # Writes after the snapshot copy the shared clusters.
    m1 = Model(16 * MiB, m0)
    sio(img, [m1.write(0, 64 * KiB, 0x33), m1.write(8 * MiB, 128 * KiB, 0x44),
              m1.write(5 * MiB + 4 * KiB, 4 * KiB, 0x45)])
    qemu_check(img)
    check_reads(qio, img, m1)
    simg("snapshot", "-c", "s2", img.name, cwd=tmp_path)
    sio(img, [m1.zero(0, 2 * MiB), m1.write(12 * MiB, 64 * KiB, 0x66)])
    qemu_check(img)
    listings_agree(img)
    assert [(i, n) for _, _, i, n, _ in table(img)] == [("1", "s1"),
                                                      ("2", "s2")]
    qimg("snapshot", "-a", "s1", img.name, cwd=tmp_path)
    qemu_check(img)
    check_reads(qio, img, m0)
    check_reads(sio, img, m0)


def test_ids_and_duplicate_names_as_qemu(tmp_path):
    """qemu-img accepts an existing name on -c (a new id); ids continue
    from the largest; both tools end with the same table."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(a, 4 * MiB)
    qio(a, ["write -P 7 0 64k"])
    shutil.copy(a, b)
    steps = [("-c", "x"), ("-c", "x"), ("-c", "2"), ("-d", "x"), ("-c", "y"),
             ("-d", "y"), ("-c", "z")]
    for act, name in steps:
        q = qimg("snapshot", act, name, a.name, cwd=tmp_path, check=False)
        s = simg("snapshot", act, name, b.name, cwd=tmp_path, check=False)
        assert (q.returncode, q.stderr) == (s.returncode, s.stderr.replace(
            "strata-img", "qemu-img")), (q.stderr, s.stderr)
    assert ([t[2:] for t in table(a)] == [t[2:] for t in table(b)]
            == [("2", "x", 4 * MiB), ("3", "2", 4 * MiB),
                ("4", "z", 4 * MiB)])
    qemu_check(b)


def test_compressed_ext_l2_and_zero_clusters(tmp_path):
    for opts in ({}, {"extended_l2": "on", "cluster_size": "64k"},
                 {"cluster_size": "4k", "refcount_bits": "1"}):
        img = tmp_path / "c.qcow2"
        if img.exists():
            img.unlink()
        create(img, 8 * MiB, **opts)
        m = Model(8 * MiB)
        qio(img, ["write -c -P 0x5a 0 64k", m.write(1 * MiB, 256 * KiB, 0x21),
                  "write -z 2M 128k"])
        m.write(0, 64 * KiB, 0x5a)
        if opts.get("refcount_bits") == "1":
            # One bit of refcount cannot count two owners: qemu-img refuses.
            p = simg("snapshot", "-c", "s", img.name, cwd=tmp_path,
                     check=False)
            assert p.returncode == 1 and "overflow" in p.stderr, p.stderr
            continue
        simg("snapshot", "-c", "s", img.name, cwd=tmp_path)
        qemu_check(img)
        m2 = Model(8 * MiB, m)
        sio(img, [m2.write(0, 4 * KiB, 0x77), m2.write(2 * MiB, 4 * KiB, 0x78),
                  m2.write(1 * MiB, 64 * KiB, 0x79)])
        qemu_check(img)
        check_reads(qio, img, m2)
        snapshot_and_check(img, m, "-a", "s")
        snapshot_and_check(img, m, "-d", "s")


def snapshot_and_check(img, model, *args):
    """strata-img snapshot ARGS on IMG, then qemu-img check and a read of
    every byte against MODEL."""
    simg("snapshot", *args, img.name, cwd=img.parent)
    qemu_check(img)
    check_reads(qio, img, model)


# ---- apply and delete qemu-img's snapshots -----------------------------------

def test_apply_and_delete_qemu_snapshots(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, 16 * MiB)
    m0 = Model(16 * MiB)
    populate(img, m0)
    qimg("snapshot", "-c", "s1", img.name, cwd=tmp_path)
    m1 = Model(16 * MiB, m0)
    qio(img, [m1.write(0, 256 * KiB, 0x31), m1.write(15 * MiB, 64 * KiB,
                                                     0x32)])
    qimg("snapshot", "-c", "s2", img.name, cwd=tmp_path)
    qio(img, ["write -P 0x99 0 8M"])
    # -a takes an id too.
    snapshot_and_check(img, m0, "-a", "1")
    snapshot_and_check(img, m1, "-a", "s2")
    snapshot_and_check(img, m1, "-d", "s1")
    snapshot_and_check(img, m1, "-d", "s2")
    h = header(img)
    assert (h["nb_snapshots"], h["snapshots_offset"]) == (0, 0)
    # Now the only owner again: writes go in place, and the file does not
    # grow.
    before = img.stat().st_size
    sio(img, [m1.write(0, 64 * KiB, 0x41)])
    assert img.stat().st_size == before
    qemu_check(img)
    check_reads(qio, img, m1)


def test_apply_restores_the_snapshot_size(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, 4 * MiB)
    m = Model(4 * MiB)
    qio(img, [m.write(3 * MiB, 64 * KiB, 0x12)])
    simg("snapshot", "-c", "small", img.name, cwd=tmp_path)
    qimg("resize", img.name, "64M", cwd=tmp_path)
    qio(img, ["write -P 0x13 60M 64k"])
    simg("snapshot", "-a", "small", img.name, cwd=tmp_path)
    assert header(img)["size"] == 4 * MiB
    qemu_check(img)
    check_reads(qio, img, m)
    listings_agree(img)


# ---- bad input ---------------------------------------------------------------

@pytest.mark.parametrize("args,rc", [
    (["-a", "nope"], 1),
    (["-d", "nope"], 1),
    (["-d", "1"], 1),         # -d takes names only
    (["-l", "-c", "x"], 1),
    (["-a", "s", "-a", "s"], 1),
    (["-z"], 1),
    ([], 0),                  # no action: nothing
])
def test_errors_match_qemu(tmp_path, args, rc):
    img = tmp_path / "a.qcow2"
    create(img, 4 * MiB)
    qimg("snapshot", "-c", "s", img.name, cwd=tmp_path)
    before = file_state(img)
    same_output(["snapshot", *args, img.name], tmp_path, rc=rc)
    assert file_state(img) == before


def test_usage_errors_and_raw(tmp_path):
    same_output(["snapshot", "-l"], tmp_path, rc=1)
    same_output(["snapshot", "-l", "a", "b"], tmp_path, rc=1)
    same_output(["snapshot", "-c"], tmp_path, rc=1)
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(MiB))
    before = file_state(raw)
    for act in ("-c", "-a", "-d"):
        q = qimg("snapshot", act, "x", raw.name, cwd=tmp_path, check=False)
        s = simg("snapshot", act, "x", raw.name, cwd=tmp_path, check=False)
        # qemu-img warns about probing raw first; the message is the last
        # line.
        assert s.returncode == q.returncode == 1
        assert (s.stderr.replace("strata-img", "qemu-img").splitlines()[-1]
                == q.stderr.splitlines()[-1])
    same_output(["snapshot", "-l", raw.name], tmp_path, rc=0)
    assert file_state(raw) == before


def hostile(tmp_path, what):
    img = tmp_path / "h.qcow2"
    create(img, 4 * MiB)
    qio(img, ["write -P 1 0 128k"])
    qimg("snapshot", "-c", "s", img.name, cwd=tmp_path)
    qimg("snapshot", "-c", "t", img.name, cwd=tmp_path)
    off = header(img)["snapshots_offset"]
    if what == "count":
        patch(img, 60, ">I", 65537)
    elif what == "offset":
        patch(img, 64, ">Q", 1 << 40)
    elif what == "unaligned":
        patch(img, 64, ">Q", off + 8)
    elif what == "extra":
        patch(img, off + 36, ">I", 0x10000)
    elif what == "names":
        patch(img, off + 14, ">H", 0xffff)
    elif what == "l1":
        patch(img, off, ">Q", (1 << 40) + 0x10000)
    elif what == "l1size":
        patch(img, off + 8, ">I", 0x10000000)
    elif what == "l1-on-active":
        patch(img, off, ">Q", header(img)["l1_table_offset"])
    elif what == "shared-l1":
        second = off + ((40 + 24 + 1 + 1 + 7) & ~7)
        patch(img, second, ">Q", struct.unpack(">Q", open(img, "rb").read()[
            off:off + 8])[0])
    elif what == "l1-entry":
        # The L1 table is where it should be, but its first entry points
        # past the end of the file.
        l1 = struct.unpack(">Q", open(img, "rb").read()[off:off + 8])[0]
        patch(img, l1, ">Q", 1 << 40)
    elif what == "table-on-reftable":
        patch(img, 64, ">Q", header(img)["refcount_table_offset"])
    return img


@pytest.mark.parametrize("what", ["count", "offset", "unaligned", "extra",
                                  "names", "l1", "l1size", "l1-on-active",
                                  "shared-l1", "l1-entry",
                                  "table-on-reftable"])
def test_hostile_snapshot_table(tmp_path, what):
    img = hostile(tmp_path, what)
    before = file_state(img)
    # Only a damaged snapshot L1 table: listing works, the table is fine.
    damaged_l1 = what in ("l1", "l1size", "l1-on-active", "shared-l1",
                          "l1-entry")
    if what == "shared-l1":
        attempts = [["-d", "s"], ["-d", "t"]]   # either would free the other's
    elif damaged_l1:
        attempts = [["-a", "s"], ["-d", "s"]]
    else:
        attempts = [["-c", "new"], ["-a", "s"], ["-d", "s"], ["-l"]]
    for args in attempts:
        p = simg("snapshot", *args, img.name, cwd=tmp_path, check=False)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        err = p.stderr.strip()
        assert err.startswith("strata-img: ") and "\n" not in err, err
        assert file_state(img) == before, args
    if damaged_l1:
        p = simg("snapshot", "-l", img.name, cwd=tmp_path)
        assert "Snapshot list:" in p.stdout
        # The healthy snapshot still applies.
        simg("snapshot", "-a", "t", img.name, cwd=tmp_path)


# ---- crash safety ------------------------------------------------------------

CRASH_OPS = {
    "create": ["-c", "new"],
    "apply": ["-a", "old"],
    "delete": ["-d", "old"],
}


@pytest.mark.parametrize("op", list(CRASH_OPS))
def test_crash_points(tmp_path, op):
    """A power failure before any write or flush of the operation (unflushed
    writes kept, lost, or partly lost) leaves an image qemu-img check finds
    consistent (leaks allowed), whose active image reads as before or, for
    -a, as the snapshot, and whose snapshots still read as taken."""
    shim_so = build_shim(tmp_path)
    orig = tmp_path / "orig.qcow2"
    create(orig, 8 * MiB)
    m_old = Model(8 * MiB)
    qio(orig, [m_old.write(0, 256 * KiB, 0x11),
               m_old.write(3 * MiB, 64 * KiB, 0x12)])
    qimg("snapshot", "-c", "old", str(orig))
    m_now = Model(8 * MiB, m_old)
    qio(orig, [m_now.write(64 * KiB, 64 * KiB, 0x21),
               m_now.write(6 * MiB, 128 * KiB, 0x22)])
    img = tmp_path / "img.qcow2"
    count = tmp_path / "count"
    shutil.copy(orig, img)
    run(binary("strata-img"), "snapshot", *CRASH_OPS[op], img,
        env=crash_env(str(shim_so), img, CRASH_COUNT=count))
    total, *hdr = map(int, count.read_text().split())
    points = set(range(1, total + 1, max(1, total // 6))) | {total}
    for h in hdr:
        points |= set(range(max(1, h - 1), min(total, h + 1) + 1))
    for n in sorted(points):
        for lose in (0, 1, 3):
            shutil.copy(orig, img)
            p = run(binary("strata-img"), "snapshot", *CRASH_OPS[op], img,
                    check=False,
                    env=crash_env(str(shim_so), img, CRASH_AT=n,
                                  CRASH_LOSE=lose))
            where = f"{op}: crash before event {n}/{total} (lose={lose})"
            assert p.returncode == 99, (where, p.returncode, p.stderr)
            c = run(qemu_img(), "check", img, check=False)
            errors = [l for l in (c.stdout + c.stderr).splitlines()
                      if "ERROR" in l]
            # Between a refcount crossing 1 and the COPIED bit following
            # it (two writes, as in QEMU) check reports OFLAG_COPIED: the
            # bit is clear on a sole owner (one copy too many later) or set
            # on a cluster whose second reference is not published yet.
            # Nothing else, and 'check -r all' repairs it.
            assert all("OFLAG_COPIED" in l for l in errors), (
                f"{where}:\n{c.stdout}{c.stderr}")
            if errors:
                run(qemu_img(), "check", "-r", "all", img, check=False)
                qemu_check(img)
            else:
                assert c.returncode in (0, 3), f"{where}:\n{c.stdout}"
            r = qio(img, m_now.read_cmds(), check=False)
            if op == "apply" and "verification failed" in r.stdout:
                r = qio(img, m_old.read_cmds(), check=False)
            # Exit 0 too: an image qemu-io cannot open verifies nothing.
            assert r.returncode == 0 and "verification failed" not in (
                r.stdout), (where, r.stdout, r.stderr)
            names = [t[3] for t in table(img)]
            if "old" in names:
                qimg("snapshot", "-a", "old", str(img))
                check_reads(qio, img, m_old)


# ---- randomized interop --------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_sequence(tmp_path, seed):
    """Random writes (qemu-io or strata-io) and snapshot operations (qemu-img
    or strata-img) on one image, against a model of the active image and
    of every snapshot; qemu-img check after every step.  Re-run a failure
    with its seed."""
    import random
    rnd = random.Random(seed)
    size = 4 * MiB
    img = tmp_path / "r.qcow2"
    create(img, size, cluster_size=rnd.choice([4096, 65536]))
    active, snaps, n = Model(size), {}, 0
    for step in range(60):
        what = rnd.choice(["write", "write", "zero", "create", "create",
                           "apply", "delete", "resize"])
        tool = rnd.choice(["qemu", "strata"])
        where = f"seed {seed} step {step}: {what} by {tool}"
        if what == "resize":
            # Cluster-aligned: QEMU leaves stale bytes in a partial last
            # cluster when it grows again (strata zeroes them).
            new = rnd.randrange(1, 96) * 65536
            (qimg if tool == "qemu" else simg)("resize", "--shrink",
                                               img.name, str(new),
                                               cwd=tmp_path)
            active = Model(new, active)
        elif what in ("write", "zero"):
            size = active.size
            off = rnd.randrange(0, size // 512) * 512
            length = min(size - off, rnd.choice([512, 4096, 65536, 300000]))
            op = (active.write(off, length, rnd.randrange(1, 256))
                  if what == "write" else active.zero(off, length))
            (qio if tool == "qemu" else sio)(img, [op])
        elif what == "create":
            n += 1
            name = f"s{n}"
            (qimg if tool == "qemu" else simg)("snapshot", "-c", name,
                                               img.name, cwd=tmp_path)
            snaps[name] = Model(active.size, active)
        elif snaps:
            name = rnd.choice(sorted(snaps))
            act = "-a" if what == "apply" else "-d"
            (qimg if tool == "qemu" else simg)("snapshot", act, name,
                                               img.name, cwd=tmp_path)
            if act == "-a":
                active = Model(snaps[name].size, snaps[name])
            else:
                del snaps[name]
        p = run(qemu_img(), "check", img, check=False)
        assert p.returncode == 0, f"{where}\n{p.stdout}{p.stderr}"
    check_reads(qio, img, active)
    for name, m in snaps.items():
        simg("snapshot", "-a", name, img.name, cwd=tmp_path)
        check_reads(qio, img, m)
    listings_agree(img)
