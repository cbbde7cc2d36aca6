"""The crash shim (tests/integration/qcow2_crash_shim.c): an LD_PRELOAD
library that stops a strata tool before its Nth write or flush of one
image, losing unflushed writes as a power failure may.

build_shim(dir) compiles it; crash_env(shim, img, CRASH_AT=n, ...) is the
environment that loads it for IMG (ASan's runtime first when the tools
are instrumented); crash_at() runs a strata-io workload on a fresh copy
of an image, stops it at one event and checks what is left.
"""
import os
import shutil

from .env import HERE, binary, need, run


def build_shim(out_dir):
    """Compile the shim into OUT_DIR; returns its path as a string."""
    out = out_dir / "crash.so"
    run(need("cc", "gcc"), "-shared", "-fPIC", "-O1", "-o", out,
        HERE / "qcow2_crash_shim.c", "-ldl")
    return str(out)


def crash_env(shim, img, **kw):
    env = dict(os.environ, CRASH_FILE=os.path.realpath(img))
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    # ASan must come first when the binary is instrumented.
    asan = run("sh", "-c", f"ldd {binary('strata-io')} | grep -o "
               "'/[^ ]*libasan[^ ]*' || true").stdout.strip()
    env["LD_PRELOAD"] = ":".join(([asan] if asan else []) + preload + [shim])
    env.update({k: str(v) for k, v in kw.items()})
    return env


def crash_at(shim, orig, img, args, n, lose, total):
    """Copy ORIG to IMG, run strata-io ARGS on it stopping before event N
    (of TOTAL) with CRASH_LOSE=LOSE, and require qemu-img check to find no
    corruption (leaks are allowed)."""
    shutil.copy(orig, img)
    p = run(binary("strata-io"), "-f", "qcow2", *args, img, check=False,
            env=crash_env(shim, img, CRASH_AT=n, CRASH_LOSE=lose))
    assert p.returncode == 99, (n, p.returncode, p.stderr)
    c = run(need("qemu-img", "qemu-utils"), "check", img, check=False)
    assert c.returncode in (0, 3) and "ERROR" not in c.stdout, (
        f"crash before event {n}/{total} (lose unflushed={lose}):\n"
        f"{c.stdout}{c.stderr}")
