#!/usr/bin/env bash
# Kata + Firecracker node storage, NVMe layout: the instance's local NVMe disks as one mdadm RAID5 array, an LVM
# volume group on it, and an LVM thin pool that containerd's devmapper snapshotter uses (device-mapper name
# VG-LV, e.g. corral-thinpool). Instance-store disks are emptied when the instance stops, so this runs on
# every boot (corral-thinpool.service, before containerd), and builds again from nothing when the array is gone.
#
#   thinpool-nvme.sh [setup]   idempotent: assemble what exists, create what does not
#
# Environment (defaults in brackets):
#   DEVICES  comma-separated disks [every "Amazon EC2 NVMe Instance Storage" disk]; RAID5 needs at least 3
#   MD [/dev/md/corral]  VG [corral]  LV [thinpool]  DATA_PERCENT [95] of the VG  META_PERCENT [1]
#   CHUNK [512K] thin-pool chunk size      PLAN=1: print every command instead of running it (../lib/run.sh)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/run.sh
. "$here/../lib/run.sh"

MD=${MD:-/dev/md/corral}
VG=${VG:-corral}
LV=${LV:-thinpool}
DATA_PERCENT=${DATA_PERCENT:-95}
META_PERCENT=${META_PERCENT:-1}
CHUNK=${CHUNK:-512K}
UNIT=/etc/systemd/system/corral-thinpool.service
KIT_DIR=${KIT_DIR:-$(cd "$here/.." && pwd)}  # where the kit lives on the node (the unit runs it from there)
PROFILE=/etc/lvm/profile/corral-thinpool.profile

instance_store_disks() {
  local link
  for link in /dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*; do
    [ -e "$link" ] || continue
    case "$link" in *-part*|*_1) continue ;; esac  # partitions and the duplicate namespace-1 links
    readlink -f "$link"
  done | sort -u
}

setup() {
  need_root
  local -a disks
  if [ -n "${DEVICES:-}" ]; then
    IFS=, read -r -a disks <<<"$DEVICES"
  else
    mapfile -t disks < <(instance_store_disks)
  fi
  [ "${#disks[@]}" -ge 3 ] || die "RAID5 needs at least 3 NVMe disks, found ${#disks[@]} (${disks[*]:-none}); \
pick an instance type with 3+ instance-store disks (e.g. m5d.metal, i3.metal, c6id.metal) or set DEVICES"
  log "disks: ${disks[*]}"

  if ! planning && [ -e "$MD" ]; then
    log "array $MD is already assembled"
  elif ! planning && mdadm --assemble "$MD" "${disks[@]}" >/dev/null 2>&1; then
    log "assembled the existing array $MD"
  else
    run mdadm --create "$MD" --run --level=5 --raid-devices="${#disks[@]}" --bitmap=internal "${disks[@]}"
    write_file /etc/mdadm/mdadm.conf.d/corral.conf 0644 <<<"ARRAY $MD metadata=1.2 name=corral"
  fi

  if ! planning && vgs "$VG" >/dev/null 2>&1; then
    log "volume group $VG exists"
  else
    run pvcreate --yes "$MD"
    run vgcreate "$VG" "$MD"
  fi

  # autoextend the pool's metadata and data before they fill (containerd's documented thin-pool profile)
  write_file "$PROFILE" 0644 <<'PROFILEEOF'
activation {
  thin_pool_autoextend_threshold=80
  thin_pool_autoextend_percent=20
}
PROFILEEOF
  if ! planning && lvs "$VG/$LV" >/dev/null 2>&1; then
    log "thin pool $VG/$LV exists"
    run lvchange --activate y "$VG/$LV"
  else
    run lvcreate --yes --wipesignatures y --name "$LV" --extents "${DATA_PERCENT}%VG" "$VG"
    run lvcreate --yes --wipesignatures y --name "${LV}meta" --extents "${META_PERCENT}%VG" "$VG"
    run lvconvert --yes --zero n --chunksize "$CHUNK" --thinpool "$VG/$LV" --poolmetadata "$VG/${LV}meta"
    run lvchange --metadataprofile corral-thinpool "$VG/$LV"
  fi
  run lvs -o+seg_monitor "$VG/$LV"

  write_file "$UNIT" 0644 <<UNITEOF
[Unit]
Description=Corral: the containerd devmapper thin pool $VG-$LV on instance-store NVMe (RAID5)
DefaultDependencies=no
After=local-fs.target systemd-udev-settle.service
Before=containerd.service
[Service]
Type=oneshot
RemainAfterExit=yes
Environment=MD=$MD VG=$VG LV=$LV
ExecStart=$KIT_DIR/kata-fc/thinpool-nvme.sh setup
[Install]
WantedBy=multi-user.target containerd.service
UNITEOF
  run systemctl daemon-reload
  run systemctl enable corral-thinpool.service
}

case "${1:-setup}" in
  setup) setup ;;
  *) die "unknown command '$1'; use: setup" ;;
esac
