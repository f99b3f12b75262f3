#!/usr/bin/env bash
# The daemons' live status page in a real browser (Debian's `chromium`, headless): a lab runs in
# the background; once its data endpoint (/status/history.json) holds samples with QBER and the
# authentication pool, Chromium loads the page (which draws its plots from that endpoint) and
# takes a screenshot; the PNG must exist and be far from blank. With UPDATE_SCREENSHOT=1 the
# screenshot of Bob's page replaces docs/status-page.png.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
if ! command -v chromium >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
chromium --version

source .ci/lab-common.sh
echo "status-page: lab up, health listeners ${health_addrs[*]}"

samples() {
  curl -sf "http://$1/status/history.json" | python3 -c '
import json, sys
h = json.load(sys.stdin)
s = [x for x in h["samples"] if x["qber_z"] is not None and x["auth_pool_bits"] is not None and x["secret_key_rate_bps"] is not None]
sys.exit(0 if len(s) >= int(sys.argv[1]) and h["now"]["link_up"] else 1)' "$2"
}
for addr in "${health_addrs[@]}"; do
  poll "samples with QBER, key rate and auth pool at $addr" 90 samples "$addr" 4
  echo "status-page: $addr/status/history.json answers with samples"
done

for i in "${!health_addrs[@]}"; do
  addr=${health_addrs[$i]}
  png="$work/status-$i.png"
  # --virtual-time-budget lets the page's script fetch its data and draw before the shot.
  timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars \
    --virtual-time-budget=8000 --window-size=1280,860 --screenshot="$png" "http://$addr/" >"$work/chromium.log" 2>&1 || {
    cat "$work/chromium.log" >&2
    exit 1
  }
  python3 - "$png" <<'PY'
import sys, zlib, struct
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
w, h = struct.unpack(">II", data[16:24])
assert (w, h) == (1280, 860), (w, h)
# Decompress the image data and count distinct byte values per row: a blank page has rows of
# one colour only; the page's text and plots give many rows with many values.
idat = b"".join(data[i + 8:i + 8 + struct.unpack(">I", data[i:i + 4])[0]]
                for i in range(8, len(data)) if data[i + 4:i + 8] == b"IDAT" and i + 8 <= len(data))
raw = zlib.decompress(idat)
stride = len(raw) // h
busy = sum(1 for r in range(h) if len(set(raw[r * stride + 1:(r + 1) * stride])) > 8)
assert len(data) > 20000 and busy > h // 4, (len(data), busy)
print(f"{sys.argv[1]}: {w}x{h} PNG, {len(data)} bytes, {busy} of {h} rows with content")
PY
done
if [ "${UPDATE_SCREENSHOT:-0}" = 1 ]; then
  cp "$work/status-$((${#health_addrs[@]} - 1)).png" docs/status-page.png
  echo "status-page: docs/status-page.png updated"
fi
echo "status-page: done in $((SECONDS - start)) s"
