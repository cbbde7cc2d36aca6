"""Concurrent writers on one qcow2 node keep every write.

qcow2_stress.c (built here against libstrata.a) runs threads that each own
a slice of every cluster and keep writing it, in shuffled orders, over a
backing file, so allocating writes to one cluster race constantly.  Every
slice must read back with its thread's pattern through qemu-io, and
'qemu-img check' must find no error and no leak.
"""
import os

import pytest

from harness import build_libstrata_program, run
from harness.qcow2 import KiB, Model, check_reads, create, qemu_check, qio

HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = 8


@pytest.fixture(scope="module")
def stress(tmp_path_factory):
    return build_libstrata_program(tmp_path_factory.mktemp("stress"), "qcow2_stress.c")


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
