"""Images left dirty by a crash with lazy refcounts (qemu-io's 'abort'
after writes) open read-only as they are, and are repaired, as QEMU
repairs them, when opened read-write: refcounts fixed, dirty bit cleared,
data intact."""
import json

from harness import binary, file_state, run
from harness.qcow2 import qemu_img, qemu_io


def dirty_image(tmp_path):
    img = tmp_path / "dirty.qcow2"
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on",
        img, "16M")
    p = run(qemu_io(), "-f", "qcow2", "-c", "write -P 1 0 1M", "-c",
            "write -P 2 4M 64k", "-c", "abort", img, check=False)
    assert p.returncode != 0          # qemu-io aborted, as asked
    info = json.loads(run(qemu_img(), "info", "--output=json", img).stdout)
    assert info["dirty-flag"] is True
    chk = run(qemu_img(), "check", img, check=False)
    assert chk.returncode == 2        # stale refcounts: corruptions
    return img


def assert_repaired(img):
    info = json.loads(run(qemu_img(), "info", "--output=json", img).stdout)
    assert info["dirty-flag"] is False
    out = json.loads(run(qemu_img(), "check", "--output=json", img).stdout)
    assert out.get("corruptions", 0) == 0 and out.get("leaks", 0) == 0
    p = run(qemu_io(), "-f", "qcow2", "-r", "-c", "read -P 1 0 1M", "-c",
            "read -P 2 4M 64k", img)
    assert "Pattern verification failed" not in p.stdout


def test_dirty_image_reads_without_changes(tmp_path):
    img = dirty_image(tmp_path)
    before = file_state(img)
    p = run(binary("strata-io"), "-f", "qcow2", "-r", "-c",
            "read -P 1 0 1M", "-c", "read -P 2 4M 64k", img)
    assert "Pattern verification failed" not in p.stdout
    assert file_state(img) == before


def test_dirty_image_repaired_on_read_write_open(tmp_path):
    img = dirty_image(tmp_path)
    run(binary("strata-io"), "-f", "qcow2", "-c", "write -P 3 8M 64k", img)
    assert_repaired(img)
    p = run(qemu_io(), "-f", "qcow2", "-r", "-c", "read -P 3 8M 64k", img)
    assert "Pattern verification failed" not in p.stdout


def test_check_repair_of_dirty_image(tmp_path):
    img = dirty_image(tmp_path)
    p = run(binary("strata-img"), "check", "-r", "all", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_repaired(img)


def test_info_of_dirty_image_matches_qemu_img(tmp_path):
    img = dirty_image(tmp_path)
    outputs = {}
    for fmt in ("human", "json"):
        ours = run(binary("strata-img"), "info", f"--output={fmt}", img)
        theirs = run(qemu_img(), "info", f"--output={fmt}", img)
        assert ours.stdout == theirs.stdout
        outputs[fmt] = ours.stdout
    assert "cleanly shut down: no" in outputs["human"].splitlines()
    assert json.loads(outputs["json"])["dirty-flag"] is True
