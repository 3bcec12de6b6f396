#!/usr/bin/env bash
# Side-by-side benchmark: every scenario against Fanfare, the seed's Python MVP and a Node.js
# `ws` server, one server at a time on this machine, then the 100k-socket farm (Fanfare only).
# Results: bench/results/<stamp>/*.json, charts next to them, and the generated block in
# docs/benchmarks.md (between the loadgen markers).
#
#   bench/run.sh            # full run (~20 min, of which the load sweep ~6)
#   QUICK=1 bench/run.sh    # small sizes, to check the script itself (~2 min)
#   STAMP=<existing run> SERVERS="node-ws" SCENARIOS="steady" SKIP_FARM=1 bench/run.sh
#                           # repeat part of a run into its directory; the report covers all of it
#                           # (add SWEEP_RATES= to leave the load sweep out, SWEEP_RATES="1000 3000" for other points)
#   STAMP=<existing run> SERVERS= SKIP_FARM=1 bench/run.sh   # only regenerate the report
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 20000
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --locked -q --workspace --bins
(cd bench/baselines && [ -d node_modules/ws ] || npm ci --no-audit --no-fund --silent)
BIN="$CARGO_TARGET_DIR/release"
STAMP="${STAMP:-$(date -u +%Y%m%dT%H%M%SZ)}"
OUT="bench/results/$STAMP"
mkdir -p "$OUT/raw"
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for pid in "${PIDS[@]:-}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT

if [ -n "${QUICK:-}" ]; then
  IDLE=2000; STEADY=1000; ALBUM=2000; STORM=1000; FARM=6000; SECONDS_EACH=5; DEFAULT_SWEEP="500 2000"
else
  IDLE=19000; STEADY=5000; ALBUM=15000; STORM=10000; FARM="${FARM:-100000}"; SECONDS_EACH=10
  DEFAULT_SWEEP="500 1000 2000 4000 8000"
fi

# The server runs on SERVER_CORE, the load generator on LOADGEN_CORE: the server's CPU figures
# are its own, and the generator's share of its core is reported (instrument-bound above 85 %).
SERVER_CORE="${SERVER_CORE:-0}"; LOADGEN_CORE="${LOADGEN_CORE:-1}"
PIN_SERVER=(taskset -c "$SERVER_CORE"); PIN_LOADGEN=(taskset -c "$LOADGEN_CORE")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_server NAME → sets SERVER_PID and TARGET
start_server() {
  local name="$1" port; port="$(free_port)"
  case "$name" in
    fanfare) "${PIN_SERVER[@]}" "$BIN/fanfare" --listen "127.0.0.1:$port" --data-dir "$TMP/data-$port" --log warn \
               --max-connections 100000 --max-connections-per-ip 100000 \
               --max-messages-per-second 100000 --max-likes-per-user 0 --max-connections-per-user 1000000 >/dev/null 2>"$TMP/$name.log" & ;;
    python-mvp) "${PIN_SERVER[@]}" python3 bench/baselines/python_mvp.py "$port" >/dev/null 2>"$TMP/$name.log" & ;;
    node-ws) "${PIN_SERVER[@]}" node bench/baselines/node_ws.js "$port" >/dev/null 2>"$TMP/$name.log" & ;;
  esac
  SERVER_PID=$!; PIDS+=("$SERVER_PID")
  TARGET="ws://127.0.0.1:$port/v1/ws"
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0; sleep 0.1; done
  echo "$name did not start" >&2; return 1
}

loadgen() { # label scenario connections [extra args…]
  local label="$1" scenario="$2" n="$3"; shift 3
  local procs=$(( (n + 14999) / 15000 ))
  echo "== $label $scenario ($n listeners, $procs processes)" >&2
  # Bounded: a server that falls over must not hang the run (Node.js `ws` in album-release).
  timeout $(( SECONDS_EACH * 6 + 120 )) "${PIN_LOADGEN[@]}" "$BIN/fanfare-loadgen" run --target "$TARGET" --label "$label" --scenario "$scenario" \
    --connections "$n" --processes "$procs" --source-ips 50 --duration "$SECONDS_EACH" \
    --server-pid "$SERVER_PID" --out "${LOADGEN_OUT:-$OUT}" "$@" >/dev/null \
    || echo "$label $scenario: the load generator failed (server fell over?)" >&2
}

# The physical limit: one pre-framed write per socket per round (and four frames per write),
# on the server's core, drained on the generator's.
for sockets in ${RAW_SOCKETS-2000 15000}; do
  for coalesce in 1 4; do
    echo "== raw_writer $sockets sockets, $coalesce frames per write" >&2
    "$BIN/raw_writer" --sockets "$sockets" --coalesce "$coalesce" --seconds 4 \
      --writer-core "$SERVER_CORE" --reader-core "$LOADGEN_CORE" >"$OUT/raw/$sockets-$coalesce.json" 2>>"$TMP/raw.log" \
      || echo "raw_writer $sockets: failed" >&2
  done
done

for server in ${SERVERS-fanfare python-mvp node-ws}; do
  for scenario in ${SCENARIOS:-idle steady album-release reconnect-storm}; do
    start_server "$server"
    case "$scenario" in
      idle) loadgen "$server" idle "$IDLE" ;;
      steady) loadgen "$server" steady "$STEADY" --tracks 1000 --rate 2000 ;;
      album-release) loadgen "$server" album-release "$ALBUM" --rate 5000 --likers 16 ;;
      reconnect-storm) loadgen "$server" reconnect-storm "$STORM" --tracks 100 --rate 500 ;;
    esac
    kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true
  done
done

# Latency and CPU against offered load: the steady scenario at several rates, every server
# (a fresh server per point). SWEEP_RATES= skips it.
for server in ${SERVERS-fanfare python-mvp node-ws}; do
  for rate in ${SWEEP_RATES-$DEFAULT_SWEEP}; do
    start_server "$server"
    LOADGEN_OUT="$OUT/sweep/$rate" loadgen "$server" steady "$STEADY" --tracks 1000 --rate "$rate"
    kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true
  done
done

# 100k sockets over a farm of 6 nodes sharing one Redis.
if [ -z "${SKIP_FARM:-}" ]; then
REDIS_PORT="$(free_port)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
PIDS+=("$!")
sleep 0.5
FARM_TARGETS=(); FARM_PIDS=()
# FARM=250000 FARM_NODES=14 bench/run.sh: each node stays under the 20 000-file limit.
FARM_NODES="${FARM_NODES:-6}"
for i in $(seq "$FARM_NODES"); do
  port="$(free_port)"
  "$BIN/fanfare" --listen "127.0.0.1:$port" --data-dir "$TMP/farm-$i" --redis "redis://127.0.0.1:$REDIS_PORT" \
    --insecure-dev-auth --log warn --max-connections 100000 --max-connections-per-ip 100000 \
    --max-likes-per-user 0 --max-connections-per-user 1000000 >/dev/null 2>"$TMP/farm-$i.log" &
  FARM_PIDS+=("$!"); PIDS+=("$!")
  FARM_TARGETS+=(--target "ws://127.0.0.1:$port/v1/ws")
done
sleep 1
echo "== fanfare-farm idle ($FARM listeners over $FARM_NODES nodes)" >&2
"$BIN/fanfare-loadgen" run "${FARM_TARGETS[@]}" --label "fanfare-farm-$FARM_NODES" --scenario idle \
  --connections "$FARM" --processes $(( (FARM + 14999) / 15000 )) --source-ips 200 \
  --duration "$SECONDS_EACH" $(printf -- '--server-pid %s ' "${FARM_PIDS[@]}") --out "$OUT/farm" >/dev/null \
  || echo "farm idle: the load generator failed" >&2
fi

{
  echo "Run $STAMP on $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -sr); command: \`bench/run.sh\`."
  echo "Raw results: \`$OUT/\`. Server pinned to core $SERVER_CORE, load generator to core $LOADGEN_CORE (\`taskset\`);"
  echo "latency from 1 000 sampled listeners (every update parsed), the rest counted on raw bytes."
  echo
  RAW_ARGS=(); for f in "$OUT"/raw/*.json; do [ -s "$f" ] && RAW_ARGS+=(--raw "$f"); done
  SWEEP_ARGS=(); [ -d "$OUT/sweep" ] && SWEEP_ARGS=(--sweep "$OUT/sweep")
  if compgen -G "$OUT/*.json" >/dev/null; then
  "$BIN/fanfare-loadgen" report --charts "docs/charts" "${RAW_ARGS[@]}" "${SWEEP_ARGS[@]}" "$OUT"/*.json
  fi
  if compgen -G "$OUT/farm/*.json" >/dev/null; then
  echo "### idle over a farm of ${FARM_NODES:-6} nodes"
  echo
  "$BIN/fanfare-loadgen" report --charts "$OUT/farm" "$OUT"/farm/*.json | sed -n '/^| server/,$p'
  fi
} > "$OUT/report.md"

python3 - "$OUT/report.md" <<'PY'
import re, sys
report = open(sys.argv[1]).read()
path = "docs/benchmarks.md"
doc = open(path).read()
block = "<!-- loadgen:begin -->\n" + report + "\n<!-- loadgen:end -->"
if "<!-- loadgen:begin -->" in doc:
    doc = re.sub(r"<!-- loadgen:begin -->.*<!-- loadgen:end -->", lambda _: block, doc, flags=re.S)
else:
    doc += "\n## Side-by-side run (bench/run.sh)\n\n" + block + "\n"
open(path, "w").write(doc)
PY
echo "wrote docs/benchmarks.md and $OUT/report.md" >&2
