"""Concurrent writers on one qcow2 node keep every write.

qcow2_stress.c (built here against libstrata.a) runs threads that each own
a slice of every cluster and keep writing it, in shuffled orders, over a
backing file, so allocating writes to one cluster race constantly.  Every
slice must read back with its thread's pattern through qemu-io, and
'qemu-img check' must find no error and no leak.
"""
import json
import os

import pytest

from conftest import BUILD, need, run
from qcow2_common import KiB, Model, check_reads, create, qemu_check, qio

HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = 8


@pytest.fixture(scope="module")
def stress(tmp_path_factory):
    cc = need("cc", "gcc")
    lib = BUILD / "libstrata.a"
    if not lib.exists():
        pytest.fail(f"{lib} not built: run 'make' first")
    opts = json.loads((BUILD / "meson-info" / "intro-buildoptions.json")
                      .read_text())
    san = next((o["value"] for o in opts if o["name"] == "b_sanitize"),
               "none")
    flags = [f"-fsanitize={san}"] if san not in ("none", "") else []
    out = tmp_path_factory.mktemp("stress") / "qcow2_stress"
    run(cc, *flags, "-O1", "-pthread", "-I", BUILD.parent / "include",
        "-o", out, os.path.join(HERE, "qcow2_stress.c"), lib,
        "-lz", "-lzstd", "-ljansson", "-lnbd")
    return out


@pytest.mark.parametrize("cs,ext", [(4 * KiB, "off"), (64 * KiB, "off"),
                                    (64 * KiB, "on")])
def test_concurrent_writes_same_clusters(tmp_path, stress, cs, ext):
    clusters = 48
    size = clusters * cs
    base = tmp_path / "base.qcow2"
    create(base, size, cluster_size=64 * KiB)
    qio(base, [f"write -q -P 0xbb 0 {size}"])
    img = tmp_path / "top.qcow2"
    create(img, size, backing="base.qcow2", cluster_size=cs,
           **({"extended_l2": "on"} if ext == "on" else {}))
    run(stress, img, THREADS, cs, clusters, 3, timeout=60)
    m = Model(size)
    slice_ = cs // THREADS
    for c in range(clusters):
        for t in range(THREADS):
            m.write(c * cs + t * slice_, slice_, t + 1)
    qemu_check(img)
    check_reads(qio, img, m)
