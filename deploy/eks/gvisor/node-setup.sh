#!/usr/bin/env bash
# gVisor node for Corral sandboxes: installs runsc and containerd-shim-runsc-v1 (checksummed, pinned), adds the
# containerd 2.x runtime io.containerd.runsc.v1 (runtime name "runsc", the RuntimeClass gvisor's handler), and
# restarts containerd when that changed. Idempotent: run it at every boot (eksctl preBootstrapCommands).
#
# Environment: RUNSC_RELEASE [20240729.0] (pin the release you tested)  RUNSC_PLATFORM [systrap] (EC2 VMs have no nested KVM)
#              PREFIX [/usr/local/bin]  PLAN=1: print the commands instead (../lib/run.sh)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib/run.sh
. "$here/../lib/run.sh"
# shellcheck source-path=SCRIPTDIR source=../lib/containerd.sh
. "$here/../lib/containerd.sh"

RUNSC_RELEASE=${RUNSC_RELEASE:-20240729.0}
RUNSC_PLATFORM=${RUNSC_PLATFORM:-systrap}
PREFIX=${PREFIX:-/usr/local/bin}
ARCH=$(uname -m)
URL="https://storage.googleapis.com/gvisor/releases/release/$RUNSC_RELEASE/$ARCH"

installed_release() { "$PREFIX/runsc" --version 2>/dev/null | sed -n 's/^runsc version release-//p'; }

install_binaries() {
  if ! planning && [ "$(installed_release)" = "$RUNSC_RELEASE" ] && [ -x "$PREFIX/containerd-shim-runsc-v1" ]; then
    log "runsc release-$RUNSC_RELEASE is installed"
    return
  fi
  local tmp=/tmp/corral-runsc
  run rm -rf "$tmp"
  run install -d "$tmp"
  local b
  for b in runsc containerd-shim-runsc-v1; do
    run curl --fail --silent --show-error --location --output "$tmp/$b" "$URL/$b"
    run curl --fail --silent --show-error --location --output "$tmp/$b.sha512" "$URL/$b.sha512"
  done
  # the .sha512 files name the bare binaries: check them where they are
  run sh -c "cd $tmp && sha512sum --check --strict runsc.sha512 containerd-shim-runsc-v1.sha512"
  run install -m 0755 "$tmp/runsc" "$tmp/containerd-shim-runsc-v1" "$PREFIX/"
  run rm -rf "$tmp"
}

main() {
  need_root
  install_binaries
  write_file /etc/containerd/runsc.toml 0644 <<EOT
# gVisor options for containerd's runsc shim (Corral EKS kit)
[runsc_config]
  platform = "$RUNSC_PLATFORM"
  # the root file system's writable layer is a file beside the image, not sandbox memory
  overlay2 = "root:self"
EOT
  write_file "$DROPIN_DIR/50-corral-runsc.toml" 0644 <<EOT
version = 3
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runsc]
  runtime_type = 'io.containerd.runsc.v1'
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runsc.options]
    TypeUrl = 'io.containerd.runsc.v1.options'
    ConfigPath = '/etc/containerd/runsc.toml'
EOT
  ensure_imports
  restart_containerd_if_changed /etc/containerd/runsc.toml "$DROPIN_DIR/50-corral-runsc.toml"
  log "gVisor ready: RuntimeClass gvisor (handler runsc) can schedule here"
}

main "$@"
