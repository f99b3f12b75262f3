#!/usr/bin/env bash
# Soak test: the local lab (Alice and Bob over the simulated 10 km fibre, release build) runs for
# DURATION_S while two demo applications fetch key pairs continuously through ETSI GS QKD 014
# (app-a at Alice's KME, app-b at Bob's, every INTERVAL_S) and check that they match. Every
# SAMPLE_S the resident memory (VmRSS) and open file descriptors of both daemons, the key pairs
# matched and failed, and each daemon's committed blocks are written to DIR/soak.csv.
#
# The daemons read ALICE__* and BOB__* overrides from the environment, e.g.
# BOB__MAX_STORED_UNITS=5000 for a store that fills within minutes (memory at a full store).
#
# Usage: tests/soak.sh [DURATION_S] [INTERVAL_S] [SAMPLE_S]
#   DURATION_S  seconds of soak (default 3600)
#   INTERVAL_S  seconds between key pairs (default 0.2)
#   SAMPLE_S    seconds between samples (default 60)
# Prints the samples as they come, then a summary: memory at the first sample after warm-up
# (a tenth of the run) and at the end, the largest, and the pairs matched and failed. Exits 1 if
# any pair failed to match or a daemon died.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-3600}
interval=${2:-0.2}
sample=${3:-60}

echo "building (release)..." >&2
cargo build --release -q -p qkdctl
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
qkdctl="$target_dir/release/qkdctl"

dir=$(mktemp -d /tmp/qkd-soak.XXXXXX)
lab="$dir/lab"
echo "soak of $duration s in $dir (lab logs: $lab/logs)" >&2
"$qkdctl" lab --dir "$lab" --duration-s "$((duration + 60))" >"$dir/lab.out" 2>&1 &
lab_pid=$!
pids=("$lab_pid")
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

json() { python3 -c "import json,sys; d=json.load(open('$lab/lab.json')); print($1)"; }
for _ in $(seq 600); do
    [ -f "$lab/lab.json" ] && [ "$(json 'd.get("running", False)')" = "True" ] && break
    sleep 0.5
done
[ "$(json 'd.get("running", False)')" = "True" ] || { echo "the lab did not start; see $dir/lab.out" >&2; exit 1; }
ca=$(json 'd["ca_cert"]')
etsi_a=$(json 'd["kmes"][0]["etsi_addr"]')
etsi_b=$(json 'd["kmes"][1]["etsi_addr"]')
cert() { json "[s for s in d['saes'] if s['sae_id']=='$1'][0]['$2']"; }
slave_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

"$qkdctl" demo-app --role slave --kme "$etsi_b" --ca "$ca" --cert "$(cert app-b cert)" --key "$(cert app-b key)" \
    --peer-sae app-a --peer "127.0.0.1:$slave_port" >"$dir/slave.log" 2>&1 &
pids+=("$!")
"$qkdctl" demo-app --role master --kme "$etsi_a" --ca "$ca" --cert "$(cert app-a cert)" --key "$(cert app-a key)" \
    --peer-sae app-b --peer "127.0.0.1:$slave_port" --interval-s "$interval" >"$dir/master.log" 2>&1 &
pids+=("$!")

daemon_pid() { pgrep -f -- "daemon $1 --config $lab/" | head -n1; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
blocks() {
    local addr
    addr=$(json "[x for x in d['daemons'] if x['node']=='$1'][0]['health_addr']")
    curl -s "http://$addr/metrics" | awk '/^qkd_blocks_total\{/ && /outcome="committed"/ {s+=$2} END {print s+0}'
}
csv="$dir/soak.csv"
echo "elapsed_s,alice_rss_kib,bob_rss_kib,alice_fds,bob_fds,pairs_matched,pairs_failed,alice_blocks,bob_blocks" >"$csv"
start=$(date +%s)
while :; do
    sleep "$sample"
    now=$(date +%s)
    a=$(daemon_pid alice) b=$(daemon_pid bob)
    if [ -z "$a" ] || [ -z "$b" ]; then
        echo "a daemon is gone (alice: ${a:-none}, bob: ${b:-none}); see $lab/logs" >&2
        exit 1
    fi
    last=$(grep -o '[0-9]* pairs matched, [0-9]* failed' "$dir/master.log" | tail -n1 || true)
    matched=$(echo "${last:-0 pairs matched, 0 failed}" | awk '{print $1}')
    failed=$(echo "${last:-0 pairs matched, 0 failed}" | awk '{print $4}')
    line="$((now - start)),$(rss_kib "$a"),$(rss_kib "$b"),$(fds "$a"),$(fds "$b"),$matched,$failed,$(blocks alice),$(blocks bob)"
    echo "$line" | tee -a "$csv"
    [ "$((now - start))" -ge "$duration" ] && break
done

python3 - "$csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
warm = rows[max(0, len(rows) // 10)]
last = rows[-1]
for node in ("alice", "bob"):
    k = f"{node}_rss_kib"
    peak = max(int(r[k]) for r in rows)
    print(f"{node}: RSS {int(warm[k]) / 1024:.1f} MiB at {warm['elapsed_s']} s, {int(last[k]) / 1024:.1f} MiB at "
          f"{last['elapsed_s']} s, peak {peak / 1024:.1f} MiB; fds {warm[node + '_fds']} -> {last[node + '_fds']}; "
          f"blocks committed {last[node + '_blocks']}")
print(f"key pairs matched {last['pairs_matched']}, failed {last['pairs_failed']}")
sys.exit(1 if int(last["pairs_failed"]) > 0 else 0)
EOF
