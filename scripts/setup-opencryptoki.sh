#!/usr/bin/env bash
# Dev/CI only: an opencryptoki software token for the PKCS#11 key backend tests (Debian/Ubuntu, as root).
#
#   sudo bash scripts/setup-opencryptoki.sh
#
# Idempotent: installs opencryptoki (and softhsm2, whose tokens the EC tests use) if missing, makes
# sure the opencryptoki config has a software-token slot, creates its lock/state directories, starts
# pkcsslotd if it is not running, and initialises the token with a test SO PIN and user PIN (an
# initialised token is left alone, keys included). Never use these PINs for anything real.
#
# Environment (defaults in brackets):
#   KAS_RAY_PKCS11_SLOT         [3]            opencryptoki slot of the software token
#   KAS_RAY_PKCS11_TOKEN_LABEL  [kas-ray-dev]  label given to a fresh token
#   KAS_RAY_PKCS11_SO_PIN       [87654321]     SO PIN (opencryptoki's factory SO PIN)
#   KAS_RAY_PKCS11_PIN          [12345678]     user PIN set on a fresh token (4-8 characters)
#   PYTHON                      [.venv/bin/python, else python3] a Python with kas-ray[pkcs11]
set -euo pipefail
cd "$(dirname "$0")/.."

SLOT="${KAS_RAY_PKCS11_SLOT:-3}"
LABEL="${KAS_RAY_PKCS11_TOKEN_LABEL:-kas-ray-dev}"
SO_PIN="${KAS_RAY_PKCS11_SO_PIN:-87654321}"
USER_PIN="${KAS_RAY_PKCS11_PIN:-12345678}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
CONF=/etc/opencryptoki/opencryptoki.conf
MODULE=/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so
say() { echo "setup-opencryptoki: $*"; }

[ "$(id -u)" = 0 ] || { say "needs root (apt-get, /etc, pkcsslotd)"; exit 1; }
command -v apt-get >/dev/null || { say "needs apt-get (Debian/Ubuntu)"; exit 1; }

# 1. packages
if ! dpkg -s opencryptoki softhsm2 >/dev/null 2>&1; then
  say "installing opencryptoki softhsm2"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq opencryptoki softhsm2 >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq opencryptoki softhsm2 >/dev/null; }
fi
[ -e "$MODULE" ] || MODULE="$(dpkg -L opencryptoki libopencryptoki0 2>/dev/null | grep -m1 '/pkcs11/libopencryptoki.so$' || true)"
[ -n "$MODULE" ] && [ -e "$MODULE" ] || { say "libopencryptoki.so not found"; exit 1; }

# 2. a software-token slot in the config
changed=0
if [ ! -f "$CONF" ]; then
  mkdir -p "$(dirname "$CONF")"
  printf 'version opencryptoki-3.1\n\nslot %s\n{\nstdll = libpkcs11_sw.so\n}\n' "$SLOT" >"$CONF"
  changed=1
elif ! grep -q 'libpkcs11_sw\.so' "$CONF"; then
  printf '\nslot %s\n{\nstdll = libpkcs11_sw.so\n}\n' "$SLOT" >>"$CONF"
  changed=1
fi

# 3. lock and state directories (group pkcs11)
getent group pkcs11 >/dev/null || groupadd --system pkcs11
if command -v systemd-tmpfiles >/dev/null && [ -f /usr/lib/tmpfiles.d/opencryptoki.conf ]; then
  systemd-tmpfiles --create /usr/lib/tmpfiles.d/opencryptoki.conf
else
  for d in /var/lock/opencryptoki /var/lock/opencryptoki/swtok /var/lib/opencryptoki \
           /var/lib/opencryptoki/swtok /var/lib/opencryptoki/swtok/TOK_OBJ; do
    mkdir -p "$d" && chown root:pkcs11 "$d" && chmod 0770 "$d"
  done
fi

# 4. the slot daemon
if pgrep -x pkcsslotd >/dev/null; then
  [ "$changed" = 0 ] || say "WARNING: $CONF changed while pkcsslotd runs: restart pkcsslotd to see slot $SLOT"
else
  say "starting pkcsslotd"
  /usr/sbin/pkcsslotd
  for _ in $(seq 50); do pgrep -x pkcsslotd >/dev/null && break; sleep 0.1; done
fi

# 5. the token (kas_ray.keys.pkcs11.provision_token: init if needed, never wipes an initialised token)
SO_PIN="$SO_PIN" USER_PIN="$USER_PIN" "$PYTHON" - "$MODULE" "$SLOT" "$LABEL" <<'PY'
import os, sys
try:
    from kas_ray.keys.pkcs11 import provision_token
    done = provision_token(sys.argv[1], int(sys.argv[2]), os.environ["SO_PIN"], os.environ["USER_PIN"], sys.argv[3])
except Exception as exc:  # noqa: BLE001 - report and fail the script
    sys.exit(f"setup-opencryptoki: token not ready: {type(exc).__name__}: {exc}")
print(f"setup-opencryptoki: token {sys.argv[3]!r} in slot {sys.argv[2]} ready ({done})")
PY
