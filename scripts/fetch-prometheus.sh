#!/usr/bin/env bash
# Dev/CI only: Debian's Prometheus server binary for the metrics scrape test (tests/test_metrics.py).
#
#   bash scripts/fetch-prometheus.sh .venv/bin
#
# Takes only /usr/bin/prometheus out of the Debian package (a 19 MB download, 48 MB on disk, a few
# seconds): `apt-get install prometheus` would also pull ~280 MB of web-UI JavaScript the test never
# uses. Needs apt-get and dpkg-deb (Debian/Ubuntu); runs `apt-get update` (as root, or with $SUDO)
# only when the package lists do not know the package yet.
set -euo pipefail

dest="${1:?usage: fetch-prometheus.sh DIR}"
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
  echo "fetch-prometheus: needs apt-get and dpkg-deb (Debian/Ubuntu); install prometheus another way" >&2
  exit 1
}
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt's download sandbox user cannot write to a root-only temp directory; it then warns and downloads
# as root anyway: quiet on the first try, loud on the retry after an update.
apt-get download -qq prometheus 2>/dev/null || { ${SUDO:-} apt-get update -qq && apt-get download -qq prometheus; }
dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/prometheus
install -m 0755 usr/bin/prometheus "$dest/prometheus"
"$dest/prometheus" --version | head -n 1
