#!/usr/bin/env bash
# Benchmark of the ETSI GS QKD 014 key delivery: Get key at KME A (master sae-a1) followed by
# Get key with key IDs at KME B (slave sae-b1), 256-bit keys, over HTTPS with client certificates
# on loopback. Two real KMEs (release build) with a pre-filled pool, the real KME-to-KME gRPC
# channel and real sled stores on disk; `qkdctl keys bench` is the client.
#
# Usage: tests/bench-kme.sh [CLIENTS] [DURATION_S] [UNITS]
#   CLIENTS     concurrent client loops (default 8)
#   DURATION_S  seconds of load (default 20)
#   UNITS       ready 256-bit units in the pool (default 200000)
# Prints the JSON report of `qkdctl keys bench` (requests/s, p50 and p99 latency per call).
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-8}
duration=${2:-20}
units=${3:-200000}

echo "building (release)..." >&2
cargo build --release -q -p qkdctl
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

dir=$(mktemp -d)
echo "starting two KMEs with $units units in $dir..." >&2
"$target_dir/release/qkdctl" keys pair --dir "$dir" --units "$units" >"$dir/kmes.log" 2>&1 &
pair_pid=$!
trap 'kill -TERM "$pair_pid" 2>/dev/null; wait; rm -rf "$dir"' EXIT
for _ in $(seq 600); do
    [ -f "$dir/ready" ] && break
    sleep 0.2
done
[ -f "$dir/ready" ] || { echo "the KMEs did not start; see $dir/kmes.log" >&2; cat "$dir/kmes.log" >&2; exit 1; }

echo "running $clients clients for $duration s..." >&2
"$target_dir/release/qkdctl" keys bench \
    --kme "$(cat "$dir/url")" --peer-kme "$(cat "$dir/peer_url")" --ca "$dir/ca.crt" \
    --master-cert "$dir/client.pem" --master-key "$dir/client.pem" --master sae-a1 \
    --slave-cert "$dir/slave.pem" --slave-key "$dir/slave.pem" --slave sae-b1 \
    --clients "$clients" --duration-s "$duration"
