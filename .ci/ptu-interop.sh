#!/usr/bin/env bash
# PicoQuant PTU files from an independent writer: qkd-timetag's PTU reader against ptufile.
#
# Installs ptufile (Christoph Gohlke's PicoQuant file library) and numpy from PyPI into a
# throw-away virtualenv, builds the `ptu_dump` example of qkd-timetag, and runs
# tests/ptu_interop.py: it writes T3 image-mode PTU files with ptufile's writer (PicoHarp T3
# and GenericT3/MultiHarp records, plus copies retyped to the other HydraHarp-layout T3
# formats), decodes them with ptufile's own decoder, and checks that ptu_dump yields the same
# tags and markers, record for record; then that malformed copies (bad magic, truncated header,
# truncated record, unknown record type) make ptu_dump fail with the file and the byte offset.
# ptufile writes no T2 files, so T2 formats are covered by the reader's unit tests only.
#
# Environment: PTUFILE_VERSION (default 2026.2.6, whose wheels and Requires-Python cover the
# CI machine's Python 3.11; later releases may drop 3.11), PTU_SEED (the histograms' seed).
set -euo pipefail
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

echo "== ptu-interop: install"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check \
    "ptufile==${PTUFILE_VERSION:-2026.2.6}" "numpy>=1.26"

echo "== ptu-interop: build ptu_dump"
cargo build --quiet -p qkd-timetag --example ptu_dump
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

echo "== ptu-interop: compare"
"$work/venv/bin/python" tests/ptu_interop.py --dump "$target_dir/debug/examples/ptu_dump" --workdir "$work/files"
echo "ptu-interop: done in $((SECONDS - start)) s"
