# scripts/lib.sh -- shared settings for the tde scripts; sourced, never run.
#
# Why this file exists: setup, demo and test must agree on where the patched
# PostgreSQL build lives, which OS user runs the server, and how to run a
# command as that user.  Keeping those decisions in one place means a fresh
# clone finds the cache that an earlier run (or an earlier clone) left behind.
#
# Environment a user may set:
#   TDE_CACHE_DIR   where PostgreSQL sources/builds are cached
#                   (default /var/cache/tde as root, ~/.cache/tde otherwise)
#   TDE_PG_SOURCE   a local PostgreSQL tarball or source tree of the pinned
#                   release (patches/pg17/SOURCE), used instead of downloading
#   TDE_PG_USER     the unprivileged OS user that runs PostgreSQL when the
#                   scripts run as root (default: tdepg)
#   CARGO_TARGET_DIR  Rust build directory (default $TDE_CACHE_DIR/cargo-target)

set -euo pipefail

TDE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_MAJOR=17
PG_CONFIGURE_FLAGS=(--enable-debug --enable-cassert --enable-tap-tests --with-openssl --with-icu)
# Bump when the build recipe in scripts/setup changes in a way that matters.
PG_RECIPE=1

if [ "$(id -u)" = 0 ]; then
  SUDO=""
  TDE_CACHE_DIR=${TDE_CACHE_DIR:-/var/cache/tde}
  TDE_PG_USER=${TDE_PG_USER:-tdepg}
else
  SUDO="sudo"
  TDE_CACHE_DIR=${TDE_CACHE_DIR:-$HOME/.cache/tde}
  TDE_PG_USER=$(id -un)
fi

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Hash of everything that changes the PostgreSQL build: the patch series,
# the configure flags and the recipe version.
pg_patch_hash() {
  {
    echo "recipe=$PG_RECIPE flags=${PG_CONFIGURE_FLAGS[*]}"
    for p in "$TDE_ROOT"/patches/pg$PG_MAJOR/*.patch; do
      [ -e "$p" ] || continue
      echo "== $(basename "$p")"; cat "$p"
    done
  } | sha256sum | cut -c1-12
}

# The PostgreSQL release we build is pinned in patches/pg$PG_MAJOR/SOURCE
# (version, SHA-256, size of the pristine tarball), so the version is known
# before any source is fetched, and every tarball is checked against the pin.
PG_PIN_FILE="$TDE_ROOT/patches/pg$PG_MAJOR/SOURCE"
pg_pin() {   # prints "VERSION SHA256 SIZE"
  local line
  line=$(grep -Ev '^[[:space:]]*(#|$)' "$PG_PIN_FILE" 2>/dev/null | head -n1)
  [[ "$line" =~ ^[0-9]+\.[0-9]+[[:space:]]+[0-9a-f]{64}[[:space:]]+[0-9]+$ ]] \
    || die "$PG_PIN_FILE must hold one line 'VERSION SHA256 SIZE' (found: '${line}')"
  echo $line
}
pg_version() { local p; p=$(pg_pin) || exit 1; set -- $p; echo "$1"; }
pg_pin_sha256() { local p; p=$(pg_pin) || exit 1; set -- $p; echo "$2"; }
pg_pin_size() { local p; p=$(pg_pin) || exit 1; set -- $p; echo "$3"; }
# The cached, verified tarball (it may not exist yet).
pg_cached_tarball() { echo "$TDE_CACHE_DIR/downloads/postgresql-${PG_MAJOR}_$(pg_version).orig.tar.bz2"; }

pg_prefix() {
  local v; v=$(pg_version)
  echo "$TDE_CACHE_DIR/pg-$v-$(pg_patch_hash)/install"
}

# Run a command as the unprivileged PostgreSQL user (a no-op wrapper when we
# are not root).  The environment given on the command line is kept.
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$TDE_PG_USER" -- env PATH="$PATH" "$@"
  else
    "$@"
  fi
}

# A scratch directory the PostgreSQL user owns.
pg_tmpdir() {
  local d; d=$(mktemp -d "${TMPDIR:-/tmp}/tde-$1.XXXXXX")
  [ "$(id -u)" = 0 ] && chown "$TDE_PG_USER" "$d"
  echo "$d"
}

setup_is_done() {
  local prefix
  prefix=$(pg_prefix 2>/dev/null) || return 1
  [ -f "$prefix/.tde-complete" ] || return 1
  command -v cargo-pgrx >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo-pgrx" ] || return 1
  cargo pgrx --version 2>/dev/null | grep -q '0\.18\.1' || return 1
  grep -qs "pg$PG_MAJOR = \"$prefix/bin/pg_config\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml" || return 1
  id "$TDE_PG_USER" >/dev/null 2>&1 || return 1
}

export PATH="$HOME/.cargo/bin:$PATH"
# Compiled Rust dependencies are cached outside the checkout too, so a fresh
# clone (CI) rebuilds only this workspace's crates.  Set CARGO_TARGET_DIR to
# override.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TDE_CACHE_DIR/cargo-target}

# Installs those of the given Debian packages that are missing, from this
# machine's own release (-t: never from a deb-src-only trixie/sid line).
apt_install_missing() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing Debian packages: ${missing[*]}"
  local release; release=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    ${release:+-t "$release"} "${missing[@]}"
}
