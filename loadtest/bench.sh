#!/usr/bin/env bash
# Runs the load benchmarks recorded in docs/benchmarks.md: starts the mock provider
# and Warden (release builds) on loopback, drives each workload direct-to-mock and
# through Warden in the same run, and stops both. When nginx is installed, the same
# non-streaming workloads also run through a plain nginx reverse proxy, for scale.
# Every run is bounded in requests and time. Usage: loadtest/bench.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-target/bench-results}
mkdir -p "$out"
cargo build --release --bin warden -p warden -q
cargo build --release -p loadtest -q

state=$(mktemp -d)
cleanup() {
    kill "${mock_pid:-}" "${warden_pid:-}" 2>/dev/null || true
    if [ -f "$state/nginx.pid" ]; then kill "$(cat "$state/nginx.pid")" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    rm -rf "$state"
}
trap cleanup EXIT

target/release/mock-provider --listen 127.0.0.1:9100 >"$state/mock.log" 2>&1 &
mock_pid=$!
# The embedded default config: loopback, mock models on 127.0.0.1:9100.
(cd "$state" && RUST_LOG=warn exec "$OLDPWD/target/release/warden" serve) >"$state/warden.log" 2>&1 &
warden_pid=$!
for _ in $(seq 50); do
    grep -q "listening" "$state/warden.log" 2>/dev/null && grep -q "listening" "$state/mock.log" && break
    sleep 0.1
done

proxy_url=http://127.0.0.1:8484/v1
run() {
    local name=$1
    shift
    echo "== $name"
    target/release/loadgen --direct http://127.0.0.1:9100/v1 \
        --warden "$proxy_url" --warden-key wdn-demo-agent-0001 \
        --model mock-small --no-progress --duration-secs 60 --json "$out/$name.json" "$@"
}

run c1 --mode closed --concurrency 1 --requests 20000 --warmup 1000
run rate1000 --mode rate --rate 1000 --requests 20000 --warmup 1000
run c32 --mode closed --concurrency 32 --requests 100000 --warmup 2000
run stream-paced --mode closed --concurrency 8 --requests 2000 --warmup 100 \
    --stream --tokens 50 --token-delay-us 1000
run stream-burst --mode closed --concurrency 4 --requests 5000 --warmup 100 \
    --stream --tokens 200

# The control plane: the demo lead stands up (and ends) a 50-agent fleet.
for concurrency in 1 8; do
    echo "== spawn-c$concurrency"
    target/release/loadgen --warden http://127.0.0.1:8484/v1 --warden-key wdn-demo-agent-0001 \
        --spawn 50 --concurrency "$concurrency" --json "$out/spawn-c$concurrency.json"
done

command -v nginx >/dev/null || exit 0
kill "$warden_pid"
wait "$warden_pid" 2>/dev/null || true
cat >"$state/nginx.conf" <<NGINX
worker_processes 2;
pid $state/nginx.pid;
error_log $state/nginx.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    upstream mock { server 127.0.0.1:9100; keepalive 256; }
    server {
        listen 127.0.0.1:8485;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
NGINX
nginx -c "$state/nginx.conf"
sleep 0.5
proxy_url=http://127.0.0.1:8485/v1
run nginx-c1 --mode closed --concurrency 1 --requests 20000 --warmup 1000
run nginx-rate1000 --mode rate --rate 1000 --requests 20000 --warmup 1000
run nginx-c32 --mode closed --concurrency 32 --requests 100000 --warmup 2000
