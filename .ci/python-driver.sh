#!/usr/bin/env bash
# The reference device driver in another language: deploy/drivers/python/replay_receiver.py
# (grpcio) serves Bob's receiver from a recording, and the daemons distil keys through it.
#
# Installs grpcio and grpcio-tools from PyPI into a throw-away virtualenv and runs the ignored
# integration test `device::the_python_reference_driver_feeds_bob_and_the_link_distils_keys`
# with QKD_PYTHON pointing at it. The test records an emulator run, generates the Python stubs of
# proto/device.proto with grpcio-tools' protoc, starts the driver, runs Alice on the recording's
# transmitter side (`replay` driver) and Bob through the Python driver (`grpc` driver), and checks
# that blocks commit with identical stores.
set -euo pipefail
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

echo "== python-driver: install grpcio"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "grpcio>=1.60" "grpcio-tools>=1.60"

echo "== python-driver: the link through the Python driver"
QKD_PYTHON="$work/venv/bin/python" cargo test --workspace --test integration -- --ignored --exact \
    device::the_python_reference_driver_feeds_bob_and_the_link_distils_keys
echo "python-driver: done in $((SECONDS - start)) s"
