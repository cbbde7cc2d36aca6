"""The crash shim (tests/integration/qcow2_crash_shim.c): an LD_PRELOAD
library that stops a strata tool before its Nth write or flush of one
image, losing unflushed writes as a power failure may.

build_shim(dir) compiles it; crash_env(shim, img, CRASH_AT=n, ...) is the
environment that loads it for IMG (ASan's runtime first when the tools
are instrumented).
"""
import os

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
