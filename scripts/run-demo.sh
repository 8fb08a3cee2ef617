#!/usr/bin/env bash
# `make run`: start the center on the demo configuration, send it the sample
# studies, and keep serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release
CONFIG=data/demo/center.toml
SAMPLES=data/demo/samples

mkdir -p data/demo
[ -f "$CONFIG" ] || cp config/demo.toml "$CONFIG"
if [ ! -d "$SAMPLES" ]; then
    "$BIN/sample-dicom" --out "$SAMPLES" --seed 2026 --profile demo
fi

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$BIN/pacs-gateway" --config "$CONFIG" > data/demo/gateway.out 2> data/demo/gateway.log &
pids+=($!)
for _ in $(seq 100); do grep -q "listening on" data/demo/gateway.out 2>/dev/null && break; sleep 0.1; done
GATEWAY=$(sed -n 's/^listening on //p' data/demo/gateway.out)
[ -n "$GATEWAY" ] || { echo "gateway did not start; see data/demo/gateway.log"; exit 1; }

"$BIN/viewer-api" --config "$CONFIG" > data/demo/viewer.out 2> data/demo/viewer.log &
pids+=($!)

HOST=${GATEWAY%:*}; PORT=${GATEWAY##*:}
echo "gateway listening on $GATEWAY (AE title COUNTYPACS); log: data/demo/gateway.log"
# Each clinic's folder is sent with that clinic's AE title.
for dir in "$SAMPLES"/*/; do
    clinic=$(basename "$dir")
    case "$clinic" in
        xinzhen) ae=XINZHEN_CT ;; baishui) ae=BAISHUI_DR ;; county) ae=COUNTYWS1 ;; *) continue ;;
    esac
    echo "== $clinic, sending as $ae"
    "$BIN/consortium-upload" --host "$HOST" --port "$PORT" --calling-ae "$ae" \
        --record data/demo/upload-record.sqlite "$dir" 2>/dev/null | tail -2 \
        || echo "sending from $clinic reported failures (see data/demo/gateway.log)"
done
echo "indexed instances: $(sqlite3 data/demo/index.sqlite 'select count(*) from instances' 2>/dev/null || echo '?')"
cat <<MSG

The center is running. Send more as a registered clinic AE, with the upload tool
(any files, folders or a DICOMDIR; ends with storage commitment):
  $BIN/consortium-upload --host $HOST --port $PORT --calling-ae XINZHEN_CT <files or folders>
or with DCMTK:
  TCP_NODELAY=1 /usr/bin/storescu -aet XINZHEN_CT -aec COUNTYPACS +sd +r $HOST $PORT <files or folders>
Check it answers:  /usr/bin/echoscu -aet XINZHEN_CT -aec COUNTYPACS $HOST $PORT
gRPC (viewer-api): $(cat data/demo/viewer.out 2>/dev/null)
Press Ctrl-C to stop.
MSG
wait
