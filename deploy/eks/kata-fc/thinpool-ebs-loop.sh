#!/usr/bin/env bash
# Kata + Firecracker node storage, EBS-loop layout: a device-mapper thin pool for containerd's devmapper
# snapshotter, made of two sparse files (data, metadata) on the node's gp3 volume, attached as loop devices.
# Firecracker has no shared file system, so every container root reaches the guest as a thin block device.
#
#   thinpool-ebs-loop.sh [setup]      create (first boot) or re-assemble (later boots) the pool; idempotent
#   thinpool-ebs-loop.sh teardown     remove the pool and detach the loop devices (keeps the files)
#
# Loop devices do not survive a reboot, so setup also installs corral-thinpool.service, which runs it again at
# boot, before containerd. Environment (defaults in brackets):
#   DIR [/var/lib/containerd/devmapper]  POOL [containerd-pool]  DATA_SIZE [200G]  META_SIZE [10G]
#   BLOCK_SECTORS [128] (64 KiB blocks)  LOW_WATER [32768] (blocks)   PLAN: see ../lib/run.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/run.sh
. "$here/../lib/run.sh"

DIR=${DIR:-/var/lib/containerd/devmapper}
POOL=${POOL:-containerd-pool}
DATA_SIZE=${DATA_SIZE:-200G}
META_SIZE=${META_SIZE:-10G}
BLOCK_SECTORS=${BLOCK_SECTORS:-128}
LOW_WATER=${LOW_WATER:-32768}
UNIT=/etc/systemd/system/corral-thinpool.service
KIT_DIR=${KIT_DIR:-$(cd "$here/.." && pwd)}  # where the kit lives on the node (the unit runs it from there)

# loop_for FILE: the loop device backing FILE, attaching one if there is none
loop_for() {
  local file=$1 dev
  if [ "$PLAN" = 1 ]; then
    run losetup --find --show "$file"
    printf '/dev/loopN-%s\n' "${file##*/}"
    return
  fi
  dev=$(losetup --associated "$file" --output NAME --noheadings | head -n 1)
  [ -n "$dev" ] || dev=$(files losetup --find --show "$file")
  printf '%s\n' "$dev"
}

setup() {
  need_root
  files install -d -m 0700 "$DIR"
  local f size
  for f in data meta; do
    size=$DATA_SIZE; [ $f = meta ] && size=$META_SIZE
    if [ "$PLAN" = 1 ] || [ ! -e "$DIR/$f" ]; then
      log "creating the sparse $f file ($size)"
      files truncate --size "$size" "$DIR/$f"
    fi
  done
  local data_dev meta_dev sectors
  data_dev=$(loop_for "$DIR/data")
  meta_dev=$(loop_for "$DIR/meta")
  log "data on $data_dev, metadata on $meta_dev"
  if ! planning && dmsetup status "$POOL" >/dev/null 2>&1; then
    log "thin pool $POOL is already active"
  else
    if [ "$PLAN" = 1 ]; then sectors="<sectors of $data_dev>"; else sectors=$(blockdev --getsz "$data_dev"); fi
    # thin-pool <metadata dev> <data dev> <block size, sectors> <low water mark, blocks> <#features> <features>
    run dmsetup create "$POOL" --table \
      "0 $sectors thin-pool $meta_dev $data_dev $BLOCK_SECTORS $LOW_WATER 1 skip_block_zeroing"
  fi
  write_file "$UNIT" 0644 <<UNITEOF
[Unit]
Description=Corral: re-assemble the containerd devmapper thin pool $POOL from its loop files
DefaultDependencies=no
After=local-fs.target
Before=containerd.service
[Service]
Type=oneshot
RemainAfterExit=yes
Environment=DIR=$DIR POOL=$POOL
ExecStart=$KIT_DIR/kata-fc/thinpool-ebs-loop.sh setup
[Install]
WantedBy=multi-user.target containerd.service
UNITEOF
  run systemctl daemon-reload
  run systemctl enable corral-thinpool.service
}

teardown() {
  need_root
  if planning || dmsetup status "$POOL" >/dev/null 2>&1; then
    run dmsetup remove "$POOL"
  fi
  local f dev
  for f in data meta; do
    if [ "$PLAN" = 1 ]; then
      run losetup --detach "/dev/loopN-$f"
      continue
    fi
    while read -r dev; do
      [ -n "$dev" ] && files losetup --detach "$dev"
    done < <(losetup --associated "$DIR/$f" --output NAME --noheadings 2>/dev/null || true)
  done
}

case "${1:-setup}" in
  setup) setup ;;
  teardown) teardown ;;
  *) die "unknown command '$1'; use: setup | teardown" ;;
esac
