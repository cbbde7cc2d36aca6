#!/usr/bin/env bash
# Build the libFuzzer targets with clang (ASan+UBSan) and run each for a
# bounded time on a seed corpus of images generated here with QEMU's tools.
#   scripts/fuzz.sh [SECONDS]      (default 60 per target)
# A crash leaves its reproducer in build-fuzz/artifacts/ and fails.
set -euo pipefail

secs=${1:-60}
top=$(cd "$(dirname "$0")/.." && pwd)
build=$top/build-fuzz
cd "$top"
if [[ ! -f $build/build.ninja ]]; then
  CC=clang meson setup "$build" -Dfuzzing=true -Db_sanitize=address,undefined \
    -Db_lundef=false -Dbuildtype=debugoptimized >/dev/null
fi
ninja -C "$build" fuzz-open-read fuzz-nbd-server >/dev/null

corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
seed() {  # NAME qemu-img-create-args... -- qemu-io commands...
  local name=$1; shift
  local args=() cmds=()
  while [[ $1 != -- ]]; do args+=("$1"); shift; done
  shift
  for c in "$@"; do cmds+=(-c "$c"); done
  qemu-img create -q -f qcow2 "${args[@]}" "$corpus/$name" 1M
  ((${#cmds[@]})) && qemu-io -f qcow2 "${cmds[@]}" "$corpus/$name" >/dev/null
  return 0
}
seed v3-512 -o cluster_size=512 -- "write -P 1 0 4k" "write -z 8k 4k"
seed v2-512 -o cluster_size=512,compat=0.10 -- "write -P 2 1k 3k"
seed v3-4k-discard -o cluster_size=4k -- "write -P 3 0 64k" "discard 16k 16k"
seed v3-extl2 -o cluster_size=16k,extended_l2=on -- "write -P 4 2k 1k" "write -z 20k 2k"
seed v3-lazy -o cluster_size=4k,lazy_refcounts=on -- "write -P 5 0 8k"
seed empty -o cluster_size=4k --
qemu-img create -q -f raw "$corpus/raw.img" 64k
qemu-img create -q -f qcow2 -o cluster_size=4k "$corpus/big.qcow2" 4M
qemu-io -f qcow2 -c 'write -P 7 0 256k' "$corpus/big.qcow2" >/dev/null
qemu-img convert -c -O qcow2 -o cluster_size=4k "$corpus/big.qcow2" "$corpus/zlib.qcow2"
qemu-img convert -c -O qcow2 -o cluster_size=4k,compression_type=zstd "$corpus/big.qcow2" "$corpus/zstd.qcow2"
rm "$corpus/big.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=4k -b raw.img -F raw "$corpus/overlay"
# Persistent bitmaps, and hostile directories made from them: each seed
# patches one field of the first directory entry (table offset into the
# header and past the end, table size overflowing, a 64 KiB name,
# granularity out of range, a duplicate name, an unknown flag).
seed bitmaps -o cluster_size=4k -- "write -P 8 0 8k"
qemu-img bitmap --add -g 4k "$corpus/bitmaps" b0
qemu-img bitmap --add "$corpus/bitmaps" b1
qemu-io -f qcow2 -c 'write -P 9 64k 4k' "$corpus/bitmaps" >/dev/null
python3 - "$corpus" <<'PY'
import struct, sys
d = sys.argv[1]
img = open(f"{d}/bitmaps", "rb").read()
ext = img.find(bytes.fromhex("23852875"))
dir_off = struct.unpack(">Q", img[ext + 24:ext + 32])[0]
patches = {
    "bm-table-in-header": (0, struct.pack(">Q", 0x200)),
    "bm-table-past-eof": (0, struct.pack(">Q", 0x7fff0000)),
    "bm-table-size-overflow": (8, struct.pack(">I", 0xffffffff)),
    "bm-name-64k": (18, struct.pack(">H", 0xffff)),
    "bm-granularity-63": (17, bytes([63])),
    "bm-granularity-8": (17, bytes([8])),
    "bm-unknown-flag": (12, struct.pack(">I", 1 << 9)),
    "bm-duplicate-name": (24, b"b1"),
}
for name, (off, raw) in patches.items():
    b = bytearray(img)
    b[dir_off + off:dir_off + off + len(raw)] = raw
    open(f"{d}/{name}", "wb").write(bytes(b))
PY

mkdir -p "$build/artifacts"
"$build/fuzz-open-read" -max_total_time="$secs" -max_len=262144 \
  -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  -artifact_prefix="$build/artifacts/" "$corpus" 2>&1 | tail -n 12

# The NBD server: seeds are client byte streams (handshake, options,
# requests) written by hand from proto.md's layouts.
ncorpus=$(mktemp -d)
trap 'rm -rf "$corpus" "$ncorpus"' EXIT
/usr/bin/python3 - "$ncorpus" <<'PY'
import struct, sys, os
d = sys.argv[1]
def opt(o, data=b""): return b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data
def req(t, off, ln, fl=0, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, fl, t, 7, off, ln) + payload
go = opt(7, struct.pack(">IH", 0, 1) + struct.pack(">H", 3))
ctx = opt(10, struct.pack(">II", 0, 2) + struct.pack(">I", 15) + b"base:allocation"
          + struct.pack(">I", 21) + b"qemu:allocation-depth")
cmds = (req(0, 0, 8192) + req(1, 100, 4, 1, b"abcd") + req(7, 0, 1 << 20)
        + req(7, 0, 65536, 8) + req(6, 8192, 4096, 2) + req(6, 0, 4096, 16)
        + req(4, 0, 4096) + req(5, 0, 4096) + req(3, 0, 0) + req(2, 0, 0))
seeds = {
  "go-structured": struct.pack(">I", 3) + opt(8) + ctx + go + cmds,
  "go-simple": struct.pack(">I", 1) + go + cmds,
  "export-name": struct.pack(">I", 1) + opt(3) + opt(9, struct.pack(">II", 0, 0))
                 + opt(1, b"") + cmds,
  "info-abort": struct.pack(">I", 3) + opt(6, struct.pack(">IH", 0, 0)) + opt(2),
}
for name, data in seeds.items():
    open(os.path.join(d, name), "wb").write(data)
PY
"$build/fuzz-nbd-server" -max_total_time="$secs" -max_len=65536 \
  -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
  -artifact_prefix="$build/artifacts/" "$ncorpus" 2>&1 | tail -n 12
