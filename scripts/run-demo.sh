#!/usr/bin/env bash
# `make run`: start the center on the demo configuration, send it the sample
# studies, and keep serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release
CONFIG=data/demo/center.toml
SAMPLES=data/demo/samples

mkdir -p data/demo
# One center per data directory: a running gateway holds this lock (and a
# second one would refuse to start anyway, after its logs were emptied here).
if command -v flock >/dev/null && [ -e data/demo/writer.lock ] \
    && ! flock -n data/demo/writer.lock true; then
    echo "a center is already running on data/demo: stop it (Ctrl-C) first"
    exit 1
fi
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
for _ in $(seq 100); do grep -q "listening on" data/demo/viewer.out 2>/dev/null && break; sleep 0.1; done
VIEWER=$(sed -n 's/^listening on //p' data/demo/viewer.out)
[ -n "$VIEWER" ] || { echo "viewer-api did not start; see data/demo/viewer.log"; exit 1; }
# Demo accounts (kept if they exist): a county radiologist and a township technician.
DEMO_PASSWORD=demo-reading-2026
for user in "dr.wang radiologist county" "tech.li technician xinzhen"; do
    set -- $user
    echo "$DEMO_PASSWORD" | "$BIN/viewer-api" --config "$CONFIG" admin create-user "$1" \
        --role "$2" --clinic "$3" >/dev/null 2>&1 || true
done

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
Read them over gRPC (viewer-api on $VIEWER; studies enter the worklist once settled):
  echo $DEMO_PASSWORD | $BIN/consortium-cli --server http://$VIEWER login dr.wang
  $BIN/consortium-cli --server http://$VIEWER worklist
  $BIN/consortium-cli --server http://$VIEWER claim <study UID>
  $BIN/consortium-cli --server http://$VIEWER study <study UID>
  $BIN/consortium-cli --server http://$VIEWER render <SOP instance UID> --out frame.png
(tech.li, a xinzhen technician, has the same demo password.)
Press Ctrl-C to stop.
MSG
wait
