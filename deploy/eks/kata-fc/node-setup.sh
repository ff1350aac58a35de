#!/usr/bin/env bash
# Kata + Firecracker node for Corral sandboxes (bare metal: Firecracker needs /dev/kvm). Builds the devmapper
# thin pool in the chosen storage layout, points containerd's devmapper snapshotter at it, and restarts
# containerd when that changed. kata-deploy (helm, values in kata-deploy-values.yaml) then installs Kata and its
# kata-fc runtime with `snapshotter = devmapper`. Idempotent: run it at every boot (eksctl preBootstrapCommands).
#
#   node-setup.sh ebs-loop | nvme
#
# Environment: as thinpool-ebs-loop.sh / thinpool-nvme.sh, and PLAN=1 (../lib/run.sh)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/run.sh
. "$here/../lib/run.sh"
# shellcheck source-path=SCRIPTDIR source=../lib/containerd.sh
. "$here/../lib/containerd.sh"

layout=${1:-}
case "$layout" in
  ebs-loop) pool=${POOL:-containerd-pool}; "$here/thinpool-ebs-loop.sh" setup ;;
  nvme) pool="${VG:-corral}-${LV:-thinpool}"; "$here/thinpool-nvme.sh" setup ;;
  *) die "choose the storage layout: node-setup.sh ebs-loop | nvme" ;;
esac

need_root
if ! planning; then
  [ -e /dev/kvm ] || die "/dev/kvm is missing: Firecracker needs a bare-metal instance (e.g. m5d.metal, c5.metal)"
fi
write_file "$DROPIN_DIR/40-corral-devmapper.toml" 0644 <<EOT
version = 3
[plugins.'io.containerd.snapshotter.v1.devmapper']
  pool_name = '$pool'
  root_path = '/var/lib/containerd/io.containerd.snapshotter.v1.devmapper'
  base_image_size = '10GB'
  discard_blocks = true
  fs_type = 'ext4'
EOT
ensure_imports
restart_containerd_if_changed "$DROPIN_DIR/40-corral-devmapper.toml"
if ! planning; then
  ctr plugins ls | grep -E 'devmapper +.*ok' >/dev/null ||
    die "containerd's devmapper snapshotter is not 'ok' (ctr plugins ls); see journalctl -u containerd"
fi
log "devmapper snapshotter on thin pool $pool is ready for kata-deploy"
