#!/usr/bin/env bash
# Set up what tlsedge needs on a fresh Debian 12 machine (Python 3.11):
#   scripts/setup.sh          the virtualenv with tlsedge (for running it)
#   scripts/setup.sh test     also the test tools and Debian packages the tests use
set -euo pipefail
cd "$(dirname "$0")/.."

want=${1:-run}
apt_packages="openssl curl"
if [ "$want" = test ]; then
  apt_packages="$apt_packages pebble etcd-server nginx haproxy caddy wrk nghttp2-client systemd chromium chromium-driver gcc libssl-dev bind9 bind9-utils etcd-client slowhttptest prometheus"
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

python=${PYTHON:-python3}
if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_packages="$apt_packages python3-venv"
fi
missing=""
for p in $apt_packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "installing Debian packages:$missing"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

stamp=.venv/.installed-$want
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -U pip
  if [ "$want" = test ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  else
    .venv/bin/pip install -q --disable-pip-version-check -e .
  fi
  touch "$stamp"
fi
