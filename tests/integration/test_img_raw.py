"""strata-img on raw images, with qemu-img as the oracle.

Each test runs the same subcommand with qemu-img and strata-img on copies of
the same input and compares outputs and exit codes, or checks strata-img's
result with qemu-img.
"""
import json
import shutil

import pytest

from harness import binary, file_state, io_cmds, run


@pytest.fixture
def strata_img():
    return binary("strata-img")


def fill(qemu_io, path, *cmds):
    run(qemu_io, "-f", "raw", *io_cmds(*cmds), path)


@pytest.fixture
def patterned(tmp_path, qemu_img, qemu_io):
    """A 4 MiB raw image with data, holes and a zeroed range."""
    img = tmp_path / "p.raw"
    run(qemu_img, "create", "-f", "raw", img, "4M")
    fill(qemu_io, img, "write -P 1 64k 64k", "write -P 2 1M 1M",
         "write -z -u 1536k 256k", "write -P 3 3M 4k")
    return img


def test_create_raw_matches_qemu(tmp_path, strata_img, qemu_img):
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    a = run(strata_img, "create", "-f", "raw", ours, "3M")
    b = run(qemu_img, "create", "-f", "raw", theirs, "3M")
    assert a.stdout == b.stdout.replace("theirs.raw", "ours.raw")
    info = json.loads(run(qemu_img, "info", "--output=json", ours).stdout)
    assert info["virtual-size"] == 3 * 1024 * 1024
    assert info["format"] == "raw"


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_create_raw_preallocation(tmp_path, strata_img, prealloc):
    img = tmp_path / "pre.raw"
    run(strata_img, "create", "-q", "-f", "raw", "-o",
        f"preallocation={prealloc}", img, "1M")
    st = img.stat()
    assert st.st_size == 1 << 20
    if prealloc == "off":
        assert st.st_blocks * 512 < 1 << 20
    else:
        assert st.st_blocks * 512 >= 1 << 20


@pytest.mark.parametrize("args,needle", [
    (["-f", "foo", "x.raw", "1M"], "Unknown file format 'foo'"),
    (["-f", "raw", "-o", "bogus=1", "x.raw", "1M"], "Invalid parameter 'bogus'"),
    (["-f", "raw", "-o", "preallocation=maybe", "x.raw", "1M"], "preallocation"),
    (["-f", "raw", "x.raw", "99999999999999999999"], "Invalid image size"),
    (["-f", "raw", "x.raw", "1Q"], "Invalid image size"),
    (["-f", "raw", "x.raw"], "size"),
    (["-f", "raw", "x.raw", "1P"], "x.raw"),
])
def test_create_bad_input_leaves_nothing(tmp_path, strata_img, args, needle):
    p = run(strata_img, "create", *args, check=False, cwd=tmp_path)
    assert p.returncode == 1
    assert needle in p.stderr
    # One message; qemu-img words a bad size suffix over two lines.
    lines = p.stderr.strip().splitlines()
    assert len(lines) == (2 if "suffixes" in p.stderr else 1), p.stderr
    assert not (tmp_path / "x.raw").exists()


def test_create_bad_input_keeps_existing_file(tmp_path, strata_img):
    img = tmp_path / "keep.raw"
    img.write_bytes(b"precious" * 1000)
    before = file_state(img)
    p = run(strata_img, "create", "-f", "raw", "-o", "bogus=1", img, "1M",
            check=False)
    assert p.returncode == 1
    assert file_state(img) == before


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_map_matches_qemu(patterned, strata_img, qemu_img, fmt):
    ours = run(strata_img, "map", f"--output={fmt}", "-f", "raw", patterned)
    theirs = run(qemu_img, "map", f"--output={fmt}", "-f", "raw", patterned)
    assert ours.stdout == theirs.stdout


@pytest.mark.parametrize("start,length", [("512", "1000"), ("64k", "1M"),
                                          ("1536k", "8M"), ("0", "0")])
def test_map_window_matches_qemu(patterned, strata_img, qemu_img, start,
                                 length):
    args = ["map", "--output=json", "-f", "raw", f"--start-offset={start}",
            f"--max-length={length}", patterned]
    assert run(strata_img, *args).stdout == run(qemu_img, *args).stdout


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_info_matches_qemu(patterned, strata_img, qemu_img, fmt):
    ours = run(strata_img, "info", f"--output={fmt}", "-f", "raw", patterned)
    theirs = run(qemu_img, "info", f"--output={fmt}", "-f", "raw", patterned)
    if fmt == "json":
        assert json.loads(ours.stdout) == json.loads(theirs.stdout)
    else:
        assert ours.stdout == theirs.stdout


def test_compare_identical_and_different(tmp_path, patterned, strata_img,
                                         qemu_img, qemu_io):
    copy = tmp_path / "copy.raw"
    shutil.copy(patterned, copy)
    for tool in (strata_img, qemu_img):
        p = run(tool, "compare", "-f", "raw", "-F", "raw", patterned, copy,
                check=False)
        assert (p.returncode, p.stdout) == (0, "Images are identical.\n")
    fill(qemu_io, copy, "write -P 9 2000000 1")
    ours = run(strata_img, "compare", "-f", "raw", "-F", "raw", patterned,
               copy, check=False)
    theirs = run(qemu_img, "compare", "-f", "raw", "-F", "raw", patterned,
                 copy, check=False)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stdout == theirs.stdout   # same sector-rounded offset


def test_compare_size_mismatch(tmp_path, patterned, strata_img, qemu_img):
    longer = tmp_path / "longer.raw"
    shutil.copy(patterned, longer)
    with open(longer, "r+b") as f:
        f.truncate(5 << 20)
    for args in ([], ["-s"]):
        ours = run(strata_img, "compare", *args, patterned, longer,
                   check=False)
        theirs = run(qemu_img, "compare", *args, patterned, longer,
                     check=False)
        assert ours.returncode == theirs.returncode
        assert ours.stdout == theirs.stdout
    with open(longer, "r+b") as f:
        f.seek((5 << 20) - 1)
        f.write(b"\1")
    ours = run(strata_img, "compare", patterned, longer, check=False)
    theirs = run(qemu_img, "compare", patterned, longer, check=False)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stdout == theirs.stdout


def test_compare_missing_file_is_error(tmp_path, patterned, strata_img):
    p = run(strata_img, "compare", patterned, tmp_path / "nope.raw",
            check=False)
    assert p.returncode == 2
    assert "nope.raw" in p.stderr


def test_unknown_subcommand(strata_img):
    p = run(strata_img, "frobnicate", check=False)
    assert p.returncode == 1
    assert "frobnicate" in p.stderr


def test_bench_touches_the_same_offsets_as_qemu(tmp_path, strata_img,
                                                qemu_img):
    """Both tools' write benches, with a stride that wraps around the image,
    leave the same blocks written (qemu-img map is the oracle)."""
    maps = []
    for tool in (strata_img, qemu_img):
        img = tmp_path / f"bench-{len(maps)}.raw"
        run(qemu_img, "create", "-q", "-f", "raw", img, "4M")
        p = run(tool, "bench", "-w", "--pattern=170", "-c", "6", "-d", "2",
                "-s", "4k", "-S", "1536k", "-f", "raw", img)
        assert p.stdout.splitlines()[0] == (
            "Sending 6 write requests, 4096 bytes each, 2 in parallel "
            "(starting at offset 0, step size 1572864)")
        maps.append(run(qemu_img, "map", "--output=json", "-f", "raw",
                        img).stdout)
    assert maps[0] == maps[1]
    assert maps[0].count('"data": true') == 6


def test_bench_request_past_end_fails(tmp_path, strata_img, qemu_img):
    img = tmp_path / "small.raw"
    run(qemu_img, "create", "-q", "-f", "raw", img, "4M")
    for tool in (strata_img, qemu_img):
        p = run(tool, "bench", "-c", "1", "-s", "4k", "-o", "4M", "-f", "raw",
                img, check=False)
        assert p.returncode == 1
        assert "Failed request" in p.stderr
