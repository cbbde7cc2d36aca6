"""strata-img check agrees with qemu-img check.

Images are made by QEMU or by strata, then (for the damaged cases) patched
with struct; both tools check the same bytes and must give the same exit
code, the same JSON text and the same per-problem lines on stderr.  Repairs
(-r leaks, -r all) are judged by qemu-img check afterwards and by reading
the guest data back with qemu-io read -P.
"""
import json
import os
import shutil
import struct

import pytest

from harness import binary, file_state, need, run
from harness.qcow2 import KiB, MiB, create, header, qemu_img, qio, sio


def strata_img():
    return binary("strata-img")


def problem_lines(text):
    """Per-problem lines (not the tools' own "prog: ..." error lines)."""
    return [l for l in text.splitlines()
            if l.strip() and not l.startswith(("qemu-img:", "strata-img:"))]


def both(img, *args, cwd=None):
    """Run both tools' check on IMG; return (qemu, strata) processes."""
    q = run(qemu_img(), "check", *args, img.name, check=False,
            cwd=cwd or img.parent)
    s = run(strata_img(), "check", *args, img.name, check=False,
            cwd=cwd or img.parent)
    return q, s


def assert_agree(img, want_rc=None):
    """Same exit code, JSON, human text and problem lines from both."""
    q, s = both(img, "--output=json")
    msg = (f"qemu-img exit {q.returncode}:\n{q.stdout}{q.stderr}\n"
           f"strata-img exit {s.returncode}:\n{s.stdout}{s.stderr}")
    assert s.returncode == q.returncode, msg
    if want_rc is not None:
        assert q.returncode == want_rc, msg
    assert s.stdout == q.stdout, msg
    if q.stdout:
        json.loads(s.stdout)
    assert problem_lines(s.stderr) == problem_lines(q.stderr), msg
    qh, sh = both(img)
    assert sh.stdout == qh.stdout and sh.returncode == qh.returncode, (
        f"human output differs:\n{qh.stdout}\n---\n{sh.stdout}")
    return q


# ---- image surgery -------------------------------------------------------

def cluster_size(img):
    return 1 << header(img)["cluster_bits"]


def refcount_entry(img, cluster):
    """File offset of the 16-bit refcount of host CLUSTER."""
    h = header(img)
    cs = 1 << h["cluster_bits"]
    per_block = cs // 2
    with open(img, "rb") as f:
        f.seek(h["refcount_table_offset"] + 8 * (cluster // per_block))
        block = struct.unpack(">Q", f.read(8))[0] & ~0x1ff
    assert block, f"no refcount block for cluster {cluster}"
    return block + 2 * (cluster % per_block)


def get_refcount(img, cluster):
    with open(img, "rb") as f:
        f.seek(refcount_entry(img, cluster))
        return struct.unpack(">H", f.read(2))[0]


def set_refcount(img, cluster, value):
    with open(img, "r+b") as f:
        f.seek(refcount_entry(img, cluster))
        f.write(struct.pack(">H", value))


def l2_entry_offset(img, guest_cluster=0):
    """File offset of the L2 entry of GUEST_CLUSTER (first L2 table)."""
    h = header(img)
    with open(img, "rb") as f:
        f.seek(h["l1_table_offset"])
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    assert l2, "no L2 table"
    return l2 + 8 * guest_cluster


def read_u64(img, off):
    with open(img, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def write_u64(img, off, v):
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", v))


def data_image(tmp_path, name="d.qcow2", cs=64 * KiB):
    """A QEMU image with data in guest clusters 0-1 and 0xAB bytes."""
    img = tmp_path / name
    create(img, 4 * MiB, cluster_size=cs)
    qio(img, [f"write -q -P 0xab 0 {2 * cs}"])
    return img


def assert_data(img, cs=64 * KiB):
    qio(img, [f"read -q -P 0xab 0 {2 * cs}", f"read -q -P 0 {2 * cs} 64k"])


def qemu_clean(img):
    p = run(qemu_img(), "check", img.name, check=False, cwd=img.parent)
    assert p.returncode == 0 and "No errors were found" in p.stdout, (
        f"qemu-img check after repair exited {p.returncode}\n"
        f"{p.stdout}{p.stderr}")


# ---- clean images --------------------------------------------------------

def fill(cs):
    """Data, zeros, a partial cluster and compressed clusters (which must
    be whole clusters)."""
    return ["write -q -P 0x11 0 100k", "write -q -z 256k 128k",
            "write -q -P 0x22 1m 4k",
            f"write -q -c -P 0x33 8m {max(cs, 128 * KiB)}",
            "write -q -P 0x44 3m 1m"]


@pytest.mark.parametrize("cs", [512, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qemu_made_images_agree(tmp_path, cs, compat):
    """Data, zero and compressed clusters: same JSON, text, exit 0."""
    img = tmp_path / "q.qcow2"
    create(img, 16 * MiB, cluster_size=cs, compat=compat)
    qio(img, fill(cs))
    q = assert_agree(img, want_rc=0)
    j = json.loads(q.stdout)
    assert j["compressed-clusters"] > 0 and j["allocated-clusters"] > 0


@pytest.mark.parametrize("cs", [512, 64 * KiB, 2 * MiB])
def test_strata_made_images_agree(tmp_path, cs):
    """Images created and written by strata (compressed clusters too,
    packed several to a host cluster) check clean in both tools."""
    img = tmp_path / "s.qcow2"
    run(strata_img(), "create", "-q", "-f", "qcow2", "-o",
        f"cluster_size={cs}", img, "16M")
    sio(img, fill(cs))
    assert_agree(img, want_rc=0)


def test_backing_chain_agrees(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, 4 * MiB)
    qio(base, ["write -q -P 0x11 0 1m"])
    create(top, 4 * MiB, backing="base.qcow2")
    qio(top, ["write -q -P 0x22 512k 64k", "write -q -z 2m 64k"])
    assert_agree(top, want_rc=0)


def test_internal_snapshot_agrees(tmp_path):
    """Clusters shared with a snapshot have refcount 2 and no COPIED."""
    img = tmp_path / "snap.qcow2"
    create(img, 4 * MiB)
    qio(img, ["write -q -P 0x11 0 1m", "write -q -c -P 0x12 2m 64k"])
    run(qemu_img(), "snapshot", "-c", "s1", img)
    qio(img, ["write -q -P 0x22 0 64k"])
    run(qemu_img(), "snapshot", "-c", "s2", img)
    assert_agree(img, want_rc=0)


def test_read_only_check_leaves_file_alone(tmp_path):
    img = data_image(tmp_path)
    set_refcount(img, 5, 2)
    before = file_state(img)
    run(strata_img(), "check", img, check=False)
    run(strata_img(), "check", "-U", img, check=False)
    assert file_state(img) == before


# ---- leaks ---------------------------------------------------------------

def leak_past_data(img):
    """Append a cluster and give it refcount 1 with nothing using it."""
    cs = cluster_size(img)
    size = os.path.getsize(img)
    end = (size + cs - 1) // cs * cs
    os.truncate(img, end + cs)
    set_refcount(img, end // cs, 1)


def test_leak_agrees_and_repairs(tmp_path):
    img = data_image(tmp_path)
    leak_past_data(img)
    q = assert_agree(img, want_rc=3)
    assert json.loads(q.stdout)["leaks"] == 1
    p = run(strata_img(), "check", "-r", "leaks", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 leaked clusters" in p.stdout and "Repairing cluster" in p.stderr
    qemu_clean(img)
    assert_data(img)


def test_leak_repair_json_reports_fixed(tmp_path):
    img = data_image(tmp_path)
    leak_past_data(img)
    shutil.copy(img, tmp_path / "q.qcow2")
    s = run(strata_img(), "check", "-r", "leaks", "--output=json", img.name,
            check=False, cwd=tmp_path)
    q = run(qemu_img(), "check", "-r", "leaks", "--output=json", "q.qcow2",
            check=False, cwd=tmp_path)
    assert (s.returncode, s.stdout.replace("d.qcow2", "q.qcow2")) == (
        q.returncode, q.stdout), f"{q.stdout}\n---\n{s.stdout}{s.stderr}"
    assert json.loads(s.stdout)["leaks-fixed"] == 1


def test_leak_with_copied_error_agrees(tmp_path):
    """Refcount 2 on a data cluster: a leak and a COPIED error (exit 2);
    -r all repairs both."""
    img = data_image(tmp_path)
    data = read_u64(img, l2_entry_offset(img)) & 0x00fffffffffffe00
    set_refcount(img, data // cluster_size(img), 2)
    assert_agree(img, want_rc=2)
    p = run(strata_img(), "check", "-r", "all", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    qemu_clean(img)
    assert_data(img)


@pytest.fixture(scope="module")
def crash_shim(tmp_path_factory):
    """tests/integration/qcow2_crash_shim.c, built: stops a writer before
    its Nth write or flush of $CRASH_FILE, as a kill would."""
    cc = need("cc", "gcc")
    out = tmp_path_factory.mktemp("shim") / "crash.so"
    run(cc, "-shared", "-fPIC", "-O1", "-o", out,
        os.path.join(os.path.dirname(__file__), "qcow2_crash_shim.c"), "-ldl")
    return str(out)


def crashing_sio(shim, img, ops, **kw):
    sio_bin = binary("strata-io")
    env = dict(os.environ, CRASH_FILE=os.path.realpath(img))
    asan = run("sh", "-c", f"ldd {sio_bin} | grep -o '/[^ ]*libasan[^ ]*'"
               " || true").stdout.strip()
    env["LD_PRELOAD"] = ":".join(([asan] if asan else []) + [shim])
    env.update({k: str(v) for k, v in kw.items()})
    return run(sio_bin, "-f", "qcow2", *sum((["-c", o] for o in ops), []),
               img, check=False, env=env)


def test_killed_writer_leak_agrees(tmp_path, crash_shim):
    """A strata-io writer stopped before each of its writes and flushes in
    turn: both tools agree on every image (clean or leaking, exit 0 or 3),
    and -r leaks leaves one that qemu-img finds clean."""
    ops = ["write -q -P 0x11 0 192k", "write -q -P 0x22 1m 64k"]
    pristine = tmp_path / "pristine.qcow2"
    create(pristine, 4 * MiB, cluster_size=64 * KiB)
    img = tmp_path / "k.qcow2"
    shutil.copy(pristine, img)
    count = tmp_path / "count"
    crashing_sio(crash_shim, img, ops, CRASH_COUNT=count)
    events = int(count.read_text().split()[0])
    leaked = 0
    for n in range(1, events + 1):
        shutil.copy(pristine, img)
        crashing_sio(crash_shim, img, ops, CRASH_AT=n)
        q = assert_agree(img)
        assert q.returncode in (0, 3), q.stdout + q.stderr
        if q.returncode == 3:
            leaked += 1
            p = run(strata_img(), "check", "-r", "leaks", img, check=False)
            assert p.returncode == 0, p.stdout + p.stderr
            qemu_clean(img)
    assert leaked, "no crash point leaked: the test proves nothing"


# ---- corruptions ---------------------------------------------------------

def test_refcount_too_low_agrees_and_repairs(tmp_path):
    """Refcount 0 for a used data cluster: corruption (exit 2) in both;
    -r all raises it so qemu-img finds the image clean, data unchanged."""
    img = data_image(tmp_path)
    data = read_u64(img, l2_entry_offset(img)) & 0x00fffffffffffe00
    set_refcount(img, data // cluster_size(img), 0)
    q = assert_agree(img, want_rc=2)
    assert "ERROR cluster" in q.stderr
    p = run(strata_img(), "check", "-r", "leaks", img, check=False)
    assert p.returncode == 1, "-r leaks must not raise refcounts"
    p = run(strata_img(), "check", "-r", "all", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    qemu_clean(img)
    assert_data(img)


def test_refcount_lowered_on_shared_cluster_repairs(tmp_path):
    """A snapshot-shared cluster with refcount 1 instead of 2 (the
    dangerous direction: a write would free it) is raised by -r all."""
    img = tmp_path / "snap.qcow2"
    create(img, 4 * MiB)
    qio(img, ["write -q -P 0xab 0 128k"])
    run(qemu_img(), "snapshot", "-c", "s1", img)
    data = read_u64(img, l2_entry_offset(img)) & 0x00fffffffffffe00
    cl = data // cluster_size(img)
    assert get_refcount(img, cl) == 2
    set_refcount(img, cl, 1)
    assert_agree(img, want_rc=2)
    p = run(strata_img(), "check", "-r", "all", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert get_refcount(img, cl) == 2
    qemu_clean(img)
    assert_data(img)


def test_l2_entry_into_header_agrees(tmp_path):
    img = data_image(tmp_path)
    write_u64(img, l2_entry_offset(img, 3), 1 << 63)   # COPIED, offset 0
    write_u64(img, l2_entry_offset(img, 4), (1 << 63) | cluster_size(img))
    assert_agree(img, want_rc=2)


def test_l2_entry_into_refcount_table_agrees(tmp_path):
    img = data_image(tmp_path)
    rt = header(img)["refcount_table_offset"]
    write_u64(img, l2_entry_offset(img, 3), (1 << 63) | rt)
    assert_agree(img, want_rc=2)


@pytest.mark.parametrize("where", ["l1", "l2", "unaligned"])
def test_malformed_entries_agree(tmp_path, where):
    img = data_image(tmp_path)
    if where == "l1":
        off = header(img)["l1_table_offset"]
        write_u64(img, off, read_u64(img, off) | (1 << 60))
    elif where == "l2":
        off = l2_entry_offset(img)
        write_u64(img, off, read_u64(img, off) | (1 << 58))
    else:
        off = l2_entry_offset(img, 1)
        write_u64(img, off, read_u64(img, off) + 512)
    q = assert_agree(img, want_rc=2)
    assert json.loads(q.stdout)["corruptions"] >= 1


def test_data_past_end_of_file_agrees(tmp_path):
    img = data_image(tmp_path)
    write_u64(img, l2_entry_offset(img, 5), (1 << 63) | (1 << 40))
    assert_agree(img, want_rc=2)


# ---- tool behaviour ------------------------------------------------------

def test_raw_image_not_supported(tmp_path):
    img = tmp_path / "r.img"
    img.write_bytes(bytes(64 * KiB))
    q, s = both(img, "-f", "raw")
    assert q.returncode == s.returncode == 63
    assert s.stderr.strip() == \
        "strata-img: This image format does not support checks"


def test_missing_file(tmp_path):
    q, s = both(tmp_path / "nope.qcow2")
    assert q.returncode == s.returncode == 1
    lines = s.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.qcow2" in lines[0], s.stderr
    assert s.stdout == ""


def test_repair_refused_with_force_share(tmp_path):
    img = data_image(tmp_path)
    leak_past_data(img)
    before = file_state(img)
    q, s = both(img, "-U", "-r", "leaks")
    assert q.returncode == s.returncode == 1
    assert file_state(img) == before


def test_quiet_prints_nothing(tmp_path):
    img = data_image(tmp_path)
    q, s = both(img, "-q")
    assert (s.returncode, s.stdout, s.stderr) == (0, "", "")


def truncate_into_data(img):
    os.truncate(img, 3 * cluster_size(img) + 100)


def huge_l1(img):
    with open(img, "r+b") as f:
        f.seek(36)
        f.write(struct.pack(">I", 0x7fffffff))


def garbage_l2(img):
    off = l2_entry_offset(img)
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(os.urandom(4096))


def garbage_refcount_table(img):
    rt = header(img)["refcount_table_offset"]
    write_u64(img, rt + 8, 0xdeadbeefcafe)
    write_u64(img, rt + 16, 0x123)


@pytest.mark.parametrize("damage", [truncate_into_data, huge_l1, garbage_l2,
                                    garbage_refcount_table])
def test_hostile_images(tmp_path, damage):
    """Exit 1 or 2 and no crash (strata's exit is not a signal)."""
    img = data_image(tmp_path)
    damage(img)
    s = run(strata_img(), "check", img, check=False, timeout=20)
    assert s.returncode in (1, 2), (
        f"exit {s.returncode}\n{s.stdout}{s.stderr}")
    assert "Sanitizer" not in s.stderr and "runtime error" not in s.stderr
    q = run(qemu_img(), "check", img, check=False)
    assert q.returncode in (1, 2)


def test_absurd_cluster_count_refused(tmp_path):
    """A sparse 300 GiB file of 512-byte clusters needs more counters than
    the check allows: exit 1 with one line saying so, at once."""
    img = tmp_path / "big.qcow2"
    create(img, MiB, cluster_size=512)
    os.truncate(img, 300 << 30)
    s = run(strata_img(), "check", img, check=False, timeout=10)
    lines = s.stderr.strip().splitlines()
    assert s.returncode == 1 and len(lines) == 1, s.stderr
    assert "more than the check supports" in lines[0]
