#!/usr/bin/env bash
# Install everything strokeseg's tests need on a fresh Debian machine, then run them.
# This is the README's test command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. Real DICOM peers and validators (dcmtk storescu/echoscu/storescp, dicom3tools dciodvfy, Orthanc).
missing=()
[ -x /usr/bin/storescu ] || missing+=(dcmtk)
[ -x /usr/bin/dciodvfy ] || missing+=(dicom3tools)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# 2. Python environment: strokeseg with the CPU runtime, training and test extras.
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[cpu,train,test]'

# 3. Static checks, then the tests (real sockets, Redis, PostgreSQL, Orthanc).
echo "== ruff"
.venv/bin/python -m ruff check service models tests
echo "== mypy"
.venv/bin/python -m mypy service
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
