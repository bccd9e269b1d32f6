# Shared by scripts/setup, scripts/test and scripts/demo. Sourced, never run.
# Defines REPO (the checkout's root), VENV (REPO/.venv) and a few message helpers.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"

say() { printf '%s\n' "$*"; }
note() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$(basename "$0")" "$1" >&2
    [[ $# -gt 1 ]] && printf '  hint: %s\n' "$2" >&2
    exit 1
}

# is_safefs_mount PATH: true if PATH is the mountpoint of a FUSE mount made by safefs.
# Reads /proc/self/mounts instead of stat()ing PATH, which would hang on a stopped daemon.
is_safefs_mount() {
    local want dev mnt fstype rest
    want="$(realpath -m -- "$1")"
    while read -r dev mnt fstype rest; do
        # /proc/mounts escapes blanks as octal (\040); printf %b turns them back.
        mnt="$(printf '%b' "$mnt")"
        [[ "$mnt" == "$want" && "$fstype" == fuse* && "$dev$fstype" == *safefs* ]] && return 0
    done </proc/self/mounts
    return 1
}
