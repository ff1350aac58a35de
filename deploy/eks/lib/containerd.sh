# shellcheck shell=bash
# containerd 2.x (config `version = 3`) drop-ins for the EKS kits. The node's /etc/containerd/config.toml (made by
# nodeadm on Amazon Linux 2023) imports /etc/containerd/config.d/*.toml; ensure_imports adds that line where a
# config lacks it, so a drop-in is never silently ignored. Needs run.sh.

CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
DROPIN_DIR=${DROPIN_DIR:-/etc/containerd/config.d}

ensure_imports() {
  if ! planning; then
    [ -f "$CONTAINERD_CONFIG" ] || die "$CONTAINERD_CONFIG does not exist: is containerd 2.x installed on this node?"
    grep -q '^version *= *3' "$CONTAINERD_CONFIG" ||
      die "$CONTAINERD_CONFIG is not a containerd 2.x config (version = 3); use a node image with containerd 2"
  fi
  run sh -c "grep -q '^imports *=.*$DROPIN_DIR' $CONTAINERD_CONFIG || sed -i \"1a imports = ['$DROPIN_DIR/*.toml']\" $CONTAINERD_CONFIG"
}

# restart_containerd_if_changed FILE...: restart containerd when any drop-in changed (by checksum stamp)
restart_containerd_if_changed() {
  local stamp=/var/lib/corral/containerd-dropins.sha256 want
  if planning; then
    run systemctl restart containerd
    return
  fi
  want=$(cat "$@" | sha256sum)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    install -d "$(dirname "$stamp")"
    if systemctl is-active --quiet containerd; then
      log "containerd configuration changed: restarting containerd"
      systemctl restart containerd
    fi
    printf '%s\n' "$want" >"$stamp"
  fi
}
