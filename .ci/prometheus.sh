#!/usr/bin/env bash
# The daemons' /metrics against a real Prometheus (Debian's `prometheus` package, which brings
# promtool): a lab runs in the background; each daemon's scrape passes `promtool check metrics`
# (the exposition format and the naming conventions); a Prometheus server scrapes both health
# listeners, and a PromQL query over its HTTP API returns the link's QBER from both ends.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
prometheus --version 2>&1 | head -1

source .ci/lab-common.sh
echo "prometheus: lab up, health listeners ${health_addrs[*]}"

# One ETSI request at each KME (Get status by each lab application), so that the scrapes hold
# the request counters and latency histograms too.
python3 - "$work/lab/lab.json" >"$work/etsi.sh" <<'PY'
import json, shlex, sys
lab = json.load(open(sys.argv[1]))
for sae, kme, slave in [(0, 0, "app-b"), (1, 1, "app-a")]:
    s = lab["saes"][sae]
    url = "https://%s/api/v1/keys/%s/status" % (lab["kmes"][kme]["etsi_addr"], slave)
    print(" ".join(map(shlex.quote, ["curl", "-sf", "-o", "/dev/null", "--cacert", lab["ca_cert"], "--cert", s["cert"], "--key", s["key"], url])))
PY
bash -e "$work/etsi.sh"

echo "== prometheus: promtool check metrics on each daemon's scrape"
for addr in "${health_addrs[@]}"; do
  curl -sf "http://$addr/metrics" >"$work/scrape.prom"
  promtool check metrics <"$work/scrape.prom"
  echo "$addr: $(grep -vc '^#' "$work/scrape.prom") samples, promtool found nothing to complain about"
done

echo "== prometheus: a Prometheus server scrapes the lab"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
targets=$(printf '"%s",' "${health_addrs[@]}")
cat >"$work/prometheus.yml" <<YAML
global:
  scrape_interval: 2s
  evaluation_interval: 2s
scrape_configs:
  - job_name: qkd
    static_configs:
      - targets: [${targets%,}]
YAML
promtool check config "$work/prometheus.yml"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$port" >"$work/prometheus.log" 2>&1 &
pids_to_stop+=("$!")

query='qkd_qber_ratio{job="qkd",basis="z"}'
both_ends() {
  curl -sfG "http://127.0.0.1:$port/api/v1/query" --data-urlencode "query=$query" >"$work/answer.json" &&
    python3 - "$work/answer.json" <<'PY'
import json, sys
answer = json.load(open(sys.argv[1]))
assert answer["status"] == "success", answer
series = {r["metric"]["node"]: float(r["value"][1]) for r in answer["data"]["result"]}
assert set(series) == {"alice", "bob"}, series
assert all(0.0 < q < 0.11 for q in series.values()), series
PY
}
if ! poll "Prometheus to answer $query for alice and bob" 60 both_ends; then
  cat "$work/prometheus.log" >&2
  exit 1
fi
python3 - "$work/answer.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["data"]["result"]:
    print(f'PromQL qkd_qber_ratio{{basis="z"}}: node={r["metric"]["node"]} QBER Z {100 * float(r["value"][1]):.2f}%')
PY
echo "prometheus: done in $((SECONDS - start)) s"
