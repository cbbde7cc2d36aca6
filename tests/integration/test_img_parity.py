"""strata-img against qemu-img 7.2, command line for command line.

Each row runs the same arguments with both tools, each in its own copy of
one set of small images (raw; qcow2 with 512 B, 64 KiB and 2 MiB clusters;
a three-deep chain; compressed and zero clusters; internal snapshots; a
persistent bitmap), and asserts the same exit code, the same stdout, the
same stderr (after the program name), and images that qemu-img info,
check and compare find the same.  The rows are the chain-toolbox
subcommands (convert, commit, rebase, resize, measure, snapshot, amend),
their error cases, and a few of create, info, check, compare and map.

Known differences are not rows: the help text and version, --object,
--image-opts beyond driver/file.filename, -p progress lines when stdout is
not a terminal, writes to images with persistent bitmaps (strata keeps
them, but lays their clusters out differently; test_qcow2_bitmaps_guard.py
and test_img_bitmap.py compare what QEMU reads back), and the rebase cases where qemu-img 7.2 changes what the guest
reads (a v2 image with no backing file, a wrong -F).
"""
import json
import shlex
import shutil
import subprocess

import pytest

from harness import binary, need

QEMU_IMG = "qemu-img"


def sh(cmd, cwd):
    subprocess.run(cmd, shell=True, cwd=cwd, check=True, capture_output=True,
                   timeout=60)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """The inputs, made with qemu-img and qemu-io."""
    need(QEMU_IMG, "qemu-utils")
    need("qemu-io", "qemu-utils")
    d = tmp_path_factory.mktemp("tpl")

    def io(img, *cmds, fmt="qcow2"):
        args = " ".join(f"-c {shlex.quote(c)}" for c in cmds)
        sh(f"qemu-io -f {fmt} {args} {img}", d)

    sh("qemu-img create -q -f raw raw.img 4M", d)
    io("raw.img", "write -P 0x11 0 64k", "write -P 0x22 1M 128k", fmt="raw")
    for cs, name, size in ((512, "q512", "4M"), (65536, "q64", "4M"),
                           (2 << 20, "q2m", "8M")):
        sh(f"qemu-img create -q -f qcow2 -o cluster_size={cs} {name}.qcow2 "
           f"{size}", d)
        io(f"{name}.qcow2", "write -P 0x33 0 64k", "write -z 1M 64k",
           "write -P 0x44 2M 4k")
    sh("qemu-img convert -c -O qcow2 q64.qcow2 comp.qcow2", d)
    sh("qemu-img create -q -f qcow2 base.qcow2 4M", d)
    io("base.qcow2", "write -P 1 0 1M", "write -P 2 2M 512k")
    sh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2", d)
    io("mid.qcow2", "write -P 3 512k 1M", "write -z 2M 64k")
    sh("qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2", d)
    io("top.qcow2", "write -P 4 3M 256k", "write -P 5 0 4k")
    sh("qemu-img create -q -f raw rbase.img 4M", d)
    io("rbase.img", "write -P 7 0 2M", fmt="raw")
    sh("qemu-img create -q -f qcow2 snap.qcow2 4M", d)
    io("snap.qcow2", "write -P 9 0 64k")
    sh("qemu-img snapshot -c s1 snap.qcow2", d)
    io("snap.qcow2", "write -P 10 0 64k")
    sh("qemu-img snapshot -c s2 snap.qcow2", d)
    io("snap.qcow2", "write -P 11 64k 64k")
    sh("qemu-img create -q -f qcow2 empty.qcow2 1M", d)
    sh("qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M", d)
    sh("qemu-img create -q -f qcow2 exist.qcow2 1M", d)
    sh("qemu-img create -q -f qcow2 -b missing.qcow2 -F qcow2 -u "
       "orphan.qcow2 1M", d)
    sh("cp q64.qcow2 bm.qcow2 && qemu-img bitmap --add bm.qcow2 bm0", d)
    # Bitmaps with data clusters: qemu-io's writes set their bits.
    sh("qemu-img create -q -f qcow2 -o cluster_size=512 bm2.qcow2 64M && "
       "qemu-img bitmap --add -g 512 bm2.qcow2 a && "
       "qemu-img bitmap --add bm2.qcow2 b && "
       "qemu-img bitmap --add --disable bm2.qcow2 c", d)
    io("bm2.qcow2", "write 0 1M", "write 32M 1M")
    sh("printf 'hello world' > text.txt", d)
    return d


def image_state(d, name):
    """What qemu-img sees in D/NAME: info, check and allocation-free
    fields, with what differs by allocation order masked."""
    info = subprocess.run([QEMU_IMG, "info", "-U", "--output=json", name],
                          cwd=d, capture_output=True, text=True)
    if info.returncode:
        return ("info fails", info.stderr)
    j = json.loads(info.stdout)
    j.pop("actual-size", None)
    for sn in j.get("snapshots", []):
        for k in ("date-sec", "date-nsec"):
            sn.pop(k, None)
    chk = subprocess.run([QEMU_IMG, "check", "-U", "--output=json", name],
                         cwd=d, capture_output=True, text=True)
    c = json.loads(chk.stdout) if chk.stdout.startswith("{") else chk.stderr
    if isinstance(c, dict):
        for k in ("image-end-offset", "allocated-clusters",
                  "fragmented-clusters"):
            c.pop(k, None)
    return (j, chk.returncode, c)


def digest(d, names_from=None):
    """Each file's bytes (those also in NAMES_FROM, when given)."""
    return {p.name: p.read_bytes() for p in d.iterdir()
            if p.is_file() and (not names_from
                                or (names_from / p.name).exists())}


# What each image needs beside it.
BACKING = {"top.qcow2": ["mid.qcow2"], "mid.qcow2": ["base.qcow2"]}


def inputs(template, cmdline):
    """The template's files CMDLINE names, with their backing files
    (copying only those keeps the file fast)."""
    names = [p.name for p in template.iterdir() if p.name in cmdline]
    for n in names:
        names += [b for b in BACKING.get(n, []) if b not in names]
    return names


def both(tmp_path, template, cmdline):
    """Run CMDLINE with both tools; return ((rc, out, err), dir) pairs."""
    strata = binary("strata-img")
    res = []
    for tool, name in ((QEMU_IMG, "q"), (strata, "s")):
        d = tmp_path / name
        d.mkdir()
        for f in inputs(template, cmdline):
            shutil.copy(template / f, d / f)
        p = subprocess.run([tool] + shlex.split(cmdline), cwd=d,
                           capture_output=True, text=True, timeout=60)
        err = p.stderr.replace("qemu-img", "IMG").replace("strata-img", "IMG")
        res.append(((p.returncode, p.stdout, err), d))
    return res


def assert_parity(tmp_path, template, cmdline, output=True):
    (q, qd), (s, sd) = both(tmp_path, template, cmdline)
    assert s[0] == q[0], (cmdline, q, s)
    if output:
        assert s[1] == q[1], cmdline
    assert s[2] == q[2], cmdline
    # The same files, and each one the tools changed reads the same.
    before, qf, sf = digest(template, qd), digest(qd), digest(sd)
    assert set(qf) == set(sf), cmdline
    for name in qf:
        if before.get(name) == qf[name] == sf[name] or name.endswith(".txt"):
            continue
        assert image_state(sd, name) == image_state(qd, name), (cmdline,
                                                                name)
        cmp = subprocess.run([QEMU_IMG, "compare", "-U", qd / name,
                              sd / name], capture_output=True, text=True)
        if "info fails" not in str(image_state(qd, name)):
            assert cmp.returncode == 0, (cmdline, name, cmp.stdout)


ROWS = {
    "measure": [
        "--size 1G -O qcow2", "--size 1G -O raw",
        "-O qcow2 q64.qcow2", "-O qcow2 --output=json q64.qcow2",
        "-O raw top.qcow2", "--output=json -O qcow2 comp.qcow2",
        "-O qcow2 bm.qcow2", "-O qcow2 bm2.qcow2", "--output=json -O qcow2 -o cluster_size=512 "
        "bm.qcow2", "-O qcow2 -o compat=0.10 bm.qcow2",
        "--size 1Q -O qcow2", "-O qcow2", "--size 1G", "-O qcow2 nope.qcow2",
        "-O foo --size 1M", "-O vmdk --size 1M",
        "-O qcow2 -o bogus=1 --size 1M", "--size 1G -O qcow2 -o help",
        "-O qcow2 --output=xml --size 1M", "-f qcow2 -O qcow2 raw.img",
        "-O qcow2 -o cluster_size=3 --size 1M", "-O qcow2 q64.qcow2 extra",
    ],
    "resize": [
        "q64.qcow2 8M", "q64.qcow2 +1M", "q64.qcow2 -1M",
        "--shrink q64.qcow2 -1M", "q64.qcow2 1M", "q64.qcow2 1Q",
        "q64.qcow2 +1Q", "-f raw raw.img 5M", "raw.img 8M", "raw.img 1M",
        "-f qcow2 raw.img 5M", "nope.qcow2 8M", "q64.qcow2",
        "--preallocation=bogus raw.img 8M", "-f raw raw.img 4097",
        "--preallocation=full --shrink -f raw raw.img 1M",
        "q64.qcow2 9223372036854775807", "snap.qcow2 8M",
        "--shrink snap.qcow2 1M", "q512.qcow2 10M", "-q q64.qcow2 8M",
        "--bogus q64.qcow2 8M", "text.txt 1M",
    ],
    "commit": [
        "top.qcow2", "-b base.qcow2 top.qcow2", "-d top.qcow2", "-q mid.qcow2",
        "raw.img", "-f raw raw.img", "nope.qcow2", "-b nope.qcow2 top.qcow2",
        "-b q64.qcow2 top.qcow2", "-r 1Q top.qcow2", "-t bogus top.qcow2",
        "-f qcow2 raw.img", "orphan.qcow2", "top.qcow2 extra", "",
        "-Z top.qcow2", "-b", "snap.qcow2",
    ],
    "rebase": [
        "-b base.qcow2 -F qcow2 top.qcow2",
        "-u -b base.qcow2 -F qcow2 top.qcow2", "-b '' top.qcow2",
        "-u -b '' top.qcow2", "-b nope.qcow2 -F qcow2 top.qcow2",
        "-b base.qcow2 -F bogus top.qcow2", "top.qcow2",
        "-b base.qcow2 -F qcow2 nope.qcow2", "-b rbase.img -F raw top.qcow2",
        "-b q64.qcow2 -F qcow2 mid.qcow2", "-f raw -b x -F qcow2 raw.img",
        "-b '' orphan.qcow2", "-u -b q64.qcow2 -F qcow2 orphan.qcow2",
        "-t bogus -b base.qcow2 -F qcow2 top.qcow2",
        "-b base.qcow2 -F qcow2 top.qcow2 extra", "-b '' q512.qcow2",
        "-b base.qcow2 -F qcow2 snap.qcow2",
    ],
    "snapshot": [
        "-l snap.qcow2", "-l empty.qcow2", "-l raw.img", "-l nope.qcow2",
        "-c s3 snap.qcow2", "-c s1 snap.qcow2", "-a s1 snap.qcow2",
        "-a nosuch snap.qcow2", "-d s1 snap.qcow2", "-d nosuch snap.qcow2",
        "-d 1 snap.qcow2", "-c x raw.img", "-a x raw.img", "snap.qcow2",
        "-l -c x snap.qcow2", "-c", "-l snap.qcow2 extra", "-c s v2.qcow2",
        "-l v2.qcow2", "-c s q2m.qcow2", "-c s comp.qcow2",
    ],
    "amend": [
        "-o compat=0.10 q64.qcow2", "-o compat=1.1 v2.qcow2",
        "-o lazy_refcounts=on q64.qcow2", "-o lazy_refcounts=on v2.qcow2",
        "-o size=8M q64.qcow2", "-o size=1M q64.qcow2",
        "-o cluster_size=4k q64.qcow2", "-o bogus=1 q64.qcow2",
        "-f qcow2 -o help", "q64.qcow2", "-o compat=0.10 raw.img",
        "-o compat=0.10 nope.qcow2", "-o compat=2 q64.qcow2",
        "-o compat=0.10 snap.qcow2", "-o compat=0.10 comp.qcow2",
        "-t bogus -o compat=0.10 q64.qcow2",
    ],
    "convert": [
        "q64.qcow2 out.raw", "-O qcow2 top.qcow2 out.qcow2",
        "-O qcow2 -c q64.qcow2 out.qcow2", "-O raw comp.qcow2 out.raw",
        "-O qcow2 -B base.qcow2 -F qcow2 top.qcow2 out.qcow2",
        "-O qcow2 -B base.qcow2 top.qcow2 out.qcow2",
        "-n -O qcow2 q64.qcow2 missing.qcow2",
        "-n -O qcow2 q64.qcow2 exist.qcow2", "-O qcow2 q64.qcow2 exist.qcow2",
        "-O qcow2 nope.qcow2 out.qcow2", "-O bogus q64.qcow2 out",
        "-f bogus q64.qcow2 out", "-O qcow2 q64.qcow2", "-O qcow2 -o help",
        "-O raw -o ?", "-O qcow2 -o help q64.qcow2 out.qcow2",
        "-O qcow2 -o bogus=1 q64.qcow2 out.qcow2",
        "-O qcow2 -o cluster_size=3 q64.qcow2 out.qcow2",
        "-O qcow2 -S 1Q q64.qcow2 out.qcow2", "-O qcow2 -m 17 q64.qcow2 o",
        "-O qcow2 -s s1 snap.qcow2 out.qcow2", "-O qcow2 -r 1Q q64.qcow2 o",
        "-O qcow2 -r 64M q64.qcow2 out.qcow2",
        "-O qcow2 -o cluster_size=512 q2m.qcow2 out.qcow2",
        "-O raw -c q64.qcow2 out.raw", "-O qcow2 snap.qcow2 out.qcow2",
        "-O qcow2 orphan.qcow2 out.qcow2", "-O qcow2 text.txt out.qcow2",
        "-O qcow2 q64.qcow2 q512.qcow2 out.qcow2", "-Z q64.qcow2 out",
        "--bitmaps -O qcow2 q64.qcow2 out.qcow2", "--bitmaps -O raw q64.qcow2 o",
        "--bitmaps -O qcow2 raw.img out.qcow2",
        "--bitmaps -O qcow2 q64.qcow2 q512.qcow2 out.qcow2",
        "--bitmaps -O qcow2 -o compat=0.10 q64.qcow2 out.qcow2",
        "--bitmaps -O qcow2 v2.qcow2 out.qcow2",
    ],
    "create": [
        "-f qcow2 x.qcow2 1M", "-f qcow2 -o cluster_size=4k,compat=0.10 x 1M",
        "-f qcow2 -b base.qcow2 -F qcow2 x.qcow2", "-f raw x.raw 1M",
        "-f qcow2 -o help", "-f raw -o help x.raw", "-f qcow2 x 1Q",
        "-f qcow2 x 99999999999999999999", "-f raw -b base.qcow2 x 1M",
        "-F qcow2 x 1M", "x 1M extra", "-f qcow2 -o size=2M x",
        "-f qcow2 -o preallocation=metadata,lazy_refcounts=on x 1M",
        "-f qcow2 -u -b base.qcow2 -F qcow2 x", "-f qcow2 -b x -F qcow2 x 1M",
        "-f qcow2 x 1M -q", "", "-f qcow2 x.qcow2 11", "-f raw x.raw 11",
        "-f qcow2 -o size=2M x 1M", "-f qcow2 -b nope -F qcow2 x 1M",
        "-f qcow2 -b orphan.qcow2 -F qcow2 x", "-f qcow2 -b raw.img -F raw x",
        "-f qcow2 -b raw.img x", "-f qcow2 -u -b nope x 1M",
        "-f qcow2 -b nope x 1M", "-f qcow2 -b orphan.qcow2 x 1M",
    ],
    "info": ["q64.qcow2 --output=json", "-f qcow2 raw.img", "", "--bogus x",
             "orphan.qcow2", "--output=json orphan.qcow2", "top.qcow2",
             "--backing-chain --output=json top.qcow2", "-f qcow2 text.txt",
             "bm.qcow2", "--output=json bm.qcow2", "bm2.qcow2",
             "--output=json bm2.qcow2"],
    "map": ["--output=json top.qcow2", "--start-offset=1Q q64.qcow2",
            "--max-length=-1 q64.qcow2",
            "--start-offset=99999999999999999999 q64.qcow2"],
    "check": ["q64.qcow2 -q", "--output=json comp.qcow2", "a b",
              "-r bogus q64.qcow2", "bm.qcow2", "--output=json bm.qcow2",
              "--output=json bm2.qcow2"],
    "compare": ["q64.qcow2 q64.qcow2 -q", "q64.qcow2", "top.qcow2 base.qcow2",
                "-s q64.qcow2 comp.qcow2", "-s q64.qcow2 raw.img",
                "-s raw.img rbase.img", "-s q64.qcow2 q512.qcow2",
                "-s top.qcow2 mid.qcow2", "-s comp.qcow2 comp.qcow2"],
}
# -l: an internal snapshot as the source.
ROWS["snapshot source"] = [
    "convert -O qcow2 -l s1 snap.qcow2 out.qcow2",
    "convert -O raw -l s2 snap.qcow2 out.raw",
    "convert -O qcow2 -l 1 snap.qcow2 out.qcow2",
    "convert -O qcow2 -l snapshot.name=s1 snap.qcow2 out.qcow2",
    "convert -O qcow2 -l snapshot.id=1,snapshot.name=s2 snap.qcow2 o.qcow2",
    "convert -O qcow2 -l snapshot.id=1,snapshot.name=s1 snap.qcow2 o.qcow2",
    "convert -O qcow2 -l nosuch snap.qcow2 out.qcow2",
    "convert -O qcow2 -l snapshot.bogus=1 snap.qcow2 out.qcow2",
    "convert -O qcow2 -l s1 raw.img out.qcow2",
    "convert -O qcow2 -l s1 snap.qcow2 q64.qcow2 out.qcow2",
    "measure -O qcow2 -l s1 snap.qcow2",
    "measure -O qcow2 -l snapshot.name=s2 --output=json snap.qcow2",
    "measure -O qcow2 -l nosuch snap.qcow2", "measure -O raw -l 2 snap.qcow2",
]
# --image-opts: the file name as an option string.
IO = "--image-opts driver=qcow2,file.filename="
ROWS["image-opts"] = [
    f"info {IO}q64.qcow2", f"info --output=json {IO}top.qcow2",
    f"check {IO}q64.qcow2", f"map --output=json {IO}q64.qcow2",
    f"compare {IO}q64.qcow2 driver=qcow2,file.filename=comp.qcow2",
    f"convert -O raw {IO}q64.qcow2 out.raw", f"commit {IO}top.qcow2",
    f"resize {IO}q64.qcow2 8M", f"snapshot -l {IO}snap.qcow2",
    f"snapshot -c x {IO}snap.qcow2", f"amend -o compat=0.10 {IO}q64.qcow2",
    f"rebase -b base.qcow2 -F qcow2 {IO}top.qcow2",
    f"measure -O qcow2 {IO}q64.qcow2", f"info {IO}nope",
    "info --image-opts q64.qcow2", f"info -f qcow2 {IO}q64.qcow2",
    "info --image-opts file.filename=q64.qcow2",
    "resize --image-opts file.filename=raw.img 8M",
]


@pytest.mark.parametrize("cmdline", [a if c in ("image-opts",
                                                 "snapshot source")
                                     else f"{c} {a}".strip()
                                     for c, rows in ROWS.items()
                                     for a in rows])
def test_parity(tmp_path, template, cmdline):
    assert_parity(tmp_path, template, cmdline)


@pytest.mark.parametrize("args", ["-O qcow2 --bogus", "-O"])
def test_measure_bad_option_is_help_and_success(tmp_path, template, args):
    """qemu-img measure answers a bad option with getopt's message and its
    help (whose text names qemu-img's version, so only the exit code and
    stderr are compared)."""
    assert_parity(tmp_path, template, f"measure {args}", output=False)


@pytest.mark.parametrize("args", [
    "-O qcow2 top.qcow2", "-O qcow2 q64.qcow2", "-O qcow2 -c q64.qcow2",
    "-O qcow2 comp.qcow2", "-O qcow2 -o cluster_size=512 q2m.qcow2",
    "-O qcow2 snap.qcow2", "-O qcow2 -B base.qcow2 -F qcow2 top.qcow2",
])
def test_convert_lays_out_clusters_as_qemu(tmp_path, template, args):
    """A converted image maps the same, host offsets included: each L2
    table is allocated before the data cluster it maps, as QEMU does."""
    (q, qd), (s, sd) = both(tmp_path, template, f"convert {args} out.qcow2")
    assert q[0] == s[0] == 0, (q, s)
    maps = [subprocess.run([QEMU_IMG, "map", "--output=json", "out.qcow2"],
                           cwd=d, capture_output=True, text=True, check=True)
            .stdout for d in (qd, sd)]
    assert maps[1] == maps[0]
    assert "offset" in maps[0] or "-c" in args  # compressed: no offsets


def test_convert_salvage_zeroes_unreadable_sectors(tmp_path):
    """--salvage: a sector that cannot be read is warned about in
    qemu-img's words and written as zeros, and the convert succeeds
    (without it, it fails).  blkdebug's options differ between the tools,
    so strata-img alone, against qemu-img's message."""
    need("qemu-io", "qemu-utils")
    src = tmp_path / "src.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", src, "64k"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", src],
                   check=True, capture_output=True)
    opts = (f"driver=raw,file.filename={src},file.driver=blkdebug,"
            "file.inject-error.0.event=read_aio,file.inject-error.0.errno=5,"
            "file.inject-error.0.sector=8")
    strata = binary("strata-img")
    bad = subprocess.run([strata, "convert", "-O", "raw", "--image-opts",
                          opts, tmp_path / "a.raw"], capture_output=True,
                         text=True)
    assert bad.returncode == 1
    p = subprocess.run([strata, "convert", "--salvage", "-O", "raw",
                        "--image-opts", opts, tmp_path / "b.raw"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ("strata-img: warning: error while reading offset "
                        "4096: Input/output error\n")
    data = (tmp_path / "b.raw").read_bytes()
    assert data == b"\1" * 4096 + b"\0" * 512 + b"\1" * (65536 - 4608)
