#!/usr/bin/env bash
# The demo: first the main job (a copy-on-read overlay over a base served
# over NBD, populated by `strata pull` while a guest reads and writes it),
# then a tour of the tools, with QEMU's tools checking every result.
# Everything lives in a temporary directory that is removed at the end;
# every process started here is stopped here.
#   scripts/demo.sh [BUILD_DIR]
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$top/build}" && pwd)
sio=$build/strata-io
simg=$build/strata-img
work=$(mktemp -d)
holder=
cleanup() {
  if [[ -n $holder ]]; then kill "$holder" 2>/dev/null || true; wait "$holder" 2>/dev/null || true; fi
  if [[ -f $work/stratad.pid ]]; then kill "$(cat "$work/stratad.pid")" 2>/dev/null || true; fi
  stop_all
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$'; printf ' %q' "$@"; printf '\n'; "$@"; }
pids=()
# In the background, from this shell, so that $! is the program itself
# ("show ... &" would fork a subshell, and killing that leaves the program).
show_bg() { printf '$'; printf ' %q' "$@"; printf ' &\n'; "$@" & pids+=($!); }
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=()
}

cd "$work"
# ---------------------------------------------------------------------------
# The main job: a VM disk on a thin copy-on-read overlay over a remote base,
# populated in the background by a rate-limited stream while the guest runs.
# ---------------------------------------------------------------------------
step "The source host: a 3-deep qcow2 chain (the golden image), 128 MiB"
show "$simg" create -q -f qcow2 gold-base.qcow2 128M
show "$sio" -c 'write -P 0x11 0 48M' -c 'write -z 48M 16M' gold-base.qcow2 >/dev/null
show "$simg" create -q -f qcow2 -b gold-base.qcow2 -F qcow2 gold-mid.qcow2
show "$sio" -c 'write -P 0x22 64M 32M' gold-mid.qcow2 >/dev/null
show "$simg" create -q -f qcow2 -b gold-mid.qcow2 -F qcow2 gold.qcow2
show "$sio" -c 'write -c -P 0x33 100M 8M' -c 'write -P 0x44 120M 4M' gold.qcow2 >/dev/null

step "It serves the disk read-only over NBD (strata-nbd, qemu-nbd's options)"
show_bg "$build/strata-nbd" -f qcow2 -r -t -e 8 -x disk -k "$work/source.sock" gold.qcow2
for _ in $(seq 100); do [[ -S $work/source.sock ]] && break; sleep 0.05; done
show nbdinfo "nbd+unix:///disk?socket=$work/source.sock"

step "The destination: a local overlay whose backing file is the export"
show "$simg" create -f qcow2 -b "nbd+unix:///disk?socket=$work/source.sock" -F raw vm.qcow2
show "$simg" info vm.qcow2

step "stratad opens it under a copy-on-read filter and serves it to the guest over NBD"
show "$build/stratad" --qmp "$work/stratad.sock" --pidfile "$work/stratad.pid" --daemonize \
  --blockdev "driver=qcow2,node-name=vm,file.driver=file,file.filename=$work/vm.qcow2" \
  --blockdev driver=copy-on-read,node-name=vm-cor,file=vm \
  --nbd-server "addr.type=unix,addr.path=$work/guest.sock" \
  --export nbd,id=guest,node-name=vm-cor,name=vm,writable=on
guest="nbd+unix:///vm?socket=$work/guest.sock"

step "The guest boots: it reads its first megabytes and writes a log"
show qemu-io -f raw -c 'read -P 0x11 0 4M' -c 'write -P 0x55 8M 1M' "$guest"
echo "What the guest read is local now (depth 0), the rest still remote:"
show "$simg" map -U vm.qcow2 | head -6

step "strata pull: stream the rest in at 40 MiB/s while the guest keeps writing"
( for i in $(seq 0 7); do
    qemu-io -f raw -c "write -P 0x66 $((70 + i))M 256k" "$guest" >/dev/null
    sleep 0.3
  done ) &
writer=$!
show "$build/strata" --socket "$work/stratad.sock" pull vm --wait --verbose --bandwidth 40
wait "$writer"
show "$build/strata" --socket "$work/stratad.sock" jobs

step "Stop the daemon and the source: the image stands alone"
kill "$(cat "$work/stratad.pid")"
for _ in $(seq 200); do [[ -e $work/stratad.pid ]] || break; sleep 0.05; done
stop_all
show "$simg" info vm.qcow2
show qemu-img check vm.qcow2

step "Verified against the source plus the guest's writes (QEMU is the oracle)"
show qemu-img convert -O qcow2 gold.qcow2 expect.qcow2
show qemu-io -c 'write -P 0x55 8M 1M' expect.qcow2 >/dev/null
for i in $(seq 0 7); do qemu-io -c "write -P 0x66 $((70 + i))M 256k" expect.qcow2 >/dev/null; done
show qemu-img compare vm.qcow2 expect.qcow2
echo "The zero range of the base stayed zero clusters (no data written):"
show qemu-img map --output=json vm.qcow2 | grep '"start": 50331648' || true

# ---------------------------------------------------------------------------
# A short tour of the rest.
# ---------------------------------------------------------------------------
img=$work/disk.raw
step "A 64 MiB sparse raw disk"
show truncate -s 64M "$img"

step "strata-io writes a boot sector, some data and a zeroed range"
show "$sio" -f raw -c 'write -P 0xeb 0 512' -c 'write -P 0x5a 1M 3M' \
  -c 'write -z -u 2M 512k' -c 'flush' "$img"

step "strata-io maps it (the same lines qemu-io prints)"
show "$sio" -f raw -c map -c length "$img"

step "QEMU reads strata's writes back (the oracle)"
show qemu-io -f raw -c 'read -P 0xeb 0 512' -c 'read -P 0x5a 1M 1M' \
  -c 'read -P 0 2M 512k' -c 'read -P 0x5a 2560k 1536k' "$img"

step "O_DIRECT with an unaligned write (bounce buffer + read-modify-write)"
show "$sio" -f raw -t none -c 'write -P 0x42 4097 1000' -c 'read -P 0x42 4097 1000' "$img"

step "Image locking interoperates with QEMU"
mkfifo "$work/cmds"
"$sio" -f raw "$img" <"$work/cmds" >/dev/null &
holder=$!
exec 3>"$work/cmds"
sleep 0.5
echo "strata-io (pid $holder) holds $img read-write; qemu-io tries to write:"
if qemu-io -f raw -c 'write 0 1' "$img"; then
  echo "unexpected: QEMU was allowed to write" >&2
  exit 1
fi
echo "refused, as it should be.  And the other way round, a second strata-io:"
if "$sio" -f raw -c 'write 0 1' "$img"; then
  echo "unexpected: a second writer was allowed" >&2
  exit 1
fi
echo "refused too.  A read with -U (force-share) still works:"
show "$sio" -U -r -f raw -c 'read -q -P 0xeb 0 512' -c length "$img"
echo quit >&3
exec 3>&-
wait "$holder"
holder=

step "A qcow2 backing chain made with strata-img: base <- overlay"
show "$simg" create -f qcow2 base.qcow2 64M
show "$sio" -c 'write -P 0x11 0 8M' -c 'write -c -P 0x22 16M 4M' base.qcow2 >/dev/null
show "$simg" create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
show "$sio" -c 'write -P 0x33 4M 2M' -c 'write -z 6M 1M' -c map overlay.qcow2

step "strata-img info and map of the chain (same JSON as qemu-img)"
show "$simg" info --backing-chain overlay.qcow2
show "$simg" map --output=json overlay.qcow2

step "QEMU checks strata's images and reads the chain"
show qemu-img check base.qcow2
show qemu-img check overlay.qcow2
show qemu-io -r -c 'read -P 0x11 0 4M' -c 'read -P 0x33 4M 2M' -c 'read -P 0 6M 1M' \
  -c 'read -P 0x22 16M 4M' overlay.qcow2
show qemu-img convert -O raw overlay.qcow2 flat.raw
show "$simg" compare overlay.qcow2 flat.raw
show "$simg" check overlay.qcow2

step "stratad owns the chain; the strata client shows the block graph"
sd=$build/stratad
show "$sd" --qmp "$work/stratad.sock" --pidfile "$work/stratad.pid" --daemonize \
  --blockdev "driver=file,node-name=base-file,filename=$work/base.qcow2" \
  --blockdev driver=qcow2,node-name=base,file=base-file \
  --blockdev "driver=file,node-name=top-file,filename=$work/overlay.qcow2" \
  --blockdev '{"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "base"}'
show "$build/strata" --socket "$work/stratad.sock" nodes
show "$build/strata" --socket "$work/stratad.sock" raw '{"execute": "query-version"}'
echo "stopping stratad (pid $(cat "$work/stratad.pid")) with SIGTERM"
kill "$(cat "$work/stratad.pid")"
for _ in $(seq 200); do [[ -e $work/stratad.pid ]] || break; sleep 0.05; done

step "Done"
echo "make check runs every test; see README.md."
