# shellcheck shell=bash
# Shared by the node scripts of the EKS kits. Every command that changes the node goes through `run`, so that
# PLAN=1 prints the exact commands instead of running them: that is what the tests assert on machines where
# device-mapper, mdadm or LVM cannot run. `log` says what is happening, on stderr.
#
#   PLAN=0 (default)  run everything
#   PLAN=1            print every command, run none
#   PLAN=files        run the steps marked `files` (files and loop devices: harmless on any Linux, and real
#                     there), print the others: how the tests run the EBS-loop layout for real on a host
#                     without device-mapper

PLAN="${PLAN:-0}"
case "$PLAN" in 0|1|files) ;; *) printf 'PLAN must be 0, 1 or files, not %s\n' "$PLAN" >&2; exit 2 ;; esac
exec 3>&1  # the plan goes to the script's stdout, even from inside $(...) captures

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

die() { log "error: $*"; exit 1; }

# quote ARG: the argument as a shell word, quoted only when it needs to be
quote() {
  case "$1" in
    "" | *[!A-Za-z0-9_./=:,@%+-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

planning() { [ "$PLAN" = 1 ] || [ "$PLAN" = files ]; }

# run CMD ARGS...: run a command, or print it (one line, shell-quoted) when planning
run() {
  if planning; then
    local out="" a
    for a in "$@"; do out+="${out:+ }$(quote "$a")"; done
    printf '%s\n' "$out" >&3
  else
    "$@"
  fi
}

# files CMD ARGS...: a file or loop-device step: real unless PLAN=1
files() {
  if [ "$PLAN" = files ]; then PLAN=0 run "$@"; else run "$@"; fi
}

# write_file PATH MODE: write stdin to PATH atomically, or print it when planning
write_file() {
  local path=$1 mode=$2 content
  content=$(cat)
  if planning; then
    printf 'write %s (mode %s):\n%s\n' "$path" "$mode" "$content" >&3
  else
    install -d "$(dirname "$path")"
    printf '%s\n' "$content" >"$path.tmp.$$"
    chmod "$mode" "$path.tmp.$$"
    mv -f "$path.tmp.$$" "$path"
  fi
}

need_root() {
  planning || [ "$(id -u)" -eq 0 ] || die "run as root (or with PLAN=1 to print the commands)"
}
