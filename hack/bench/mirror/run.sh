#!/usr/bin/env bash
# Benchmark: noexit-operator mirror (cache hits) against nginx serving the same files, in the
# same run, with wrk at 64 connections: req/s for PACKAGES.gz, MB/s for a 4 MiB tarball, p99.
# nginx is also the mirror's upstream, so the mirror's cache is filled from it, verified.
#
#   sudo hack/bench/mirror/run.sh     # DURATION=10s CONNS=64 THREADS=2 ROUNDS=3 by default
#
# Needs root only to install nginx-light and wrk when they are missing. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
ENTRIES=${ENTRIES:-2000}
ROUNDS=${ROUNDS:-3}

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release -q -p noexit-operator --bin noexit-operator
BIN=target/release/noexit-operator

work=$(mktemp -d /tmp/noexit-mirror-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# --- the repository: a 4 MiB tarball and an index of $ENTRIES packages -----------------------
contrib=$work/repo/src/contrib
mkdir -p "$contrib"
head -c $((4 << 20)) /dev/urandom > "$contrib/benchpkg_1.0.tar.gz"
md5=$(md5sum "$contrib/benchpkg_1.0.tar.gz" | cut -d' ' -f1)
{
  printf 'Package: benchpkg\nVersion: 1.0\nLicense: MIT\nNeedsCompilation: no\nMD5sum: %s\n\n' "$md5"
  for i in $(seq 1 "$ENTRIES"); do
    printf 'Package: pkg%05d\nVersion: 1.%d.0\nDepends: R (>= 3.5.0)\nImports: stats, utils, pkg%05d\nLicense: GPL-2 | GPL-3\nMD5sum: %032x\nNeedsCompilation: no\n\n' \
      "$i" "$i" $(( (i + 1) % ENTRIES + 1 )) "$i"
  done
} > "$contrib/PACKAGES"
gzip -6 -k -n "$contrib/PACKAGES"
chmod -R a+rX "$work"   # nginx workers run unprivileged

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NGINX_PORT=$(port)
MIRROR_PORT=$(port)

# --- nginx: the reference (and the mirror's upstream) ----------------------------------------
mkdir -p "$work/nginx/logs"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 100000;
  types { application/gzip gz; }
  client_body_temp_path $work/nginx/body; proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi; uwsgi_temp_path $work/nginx/uwsgi; scgi_temp_path $work/nginx/scgi;
  server { listen 127.0.0.1:$NGINX_PORT; root $work/repo; }
}
CONF
"$NGINX" -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' &
pids+=($!)

# --- the mirror: every project may install everything; 127.0.0.1 is a workspace --------------
printf 'projects:\n  bench: {}\n' > "$work/policy.yaml"
printf 'clients:\n  127.0.0.1: bench/ws\n' > "$work/clients.yaml"
RUST_LOG=warn "$BIN" mirror --listen "127.0.0.1:$MIRROR_PORT" \
  --upstream "http://127.0.0.1:$NGINX_PORT" --allow-http-upstream --cache-dir "$work/cache" \
  --policy "$work/policy.yaml" --clients "$work/clients.yaml" --audit-file "$work/audit.jsonl" \
  --max-connections-per-client 1024 &
pids+=($!)

for url in "http://127.0.0.1:$NGINX_PORT/src/contrib/PACKAGES" "http://127.0.0.1:$MIRROR_PORT/healthz"; do
  for _ in $(seq 1 100); do curl -fs -o /dev/null "$url" && break; sleep 0.1; done
done
# Warm the cache (and check what the mirror serves is what upstream has).
got=$(curl -fs "http://127.0.0.1:$MIRROR_PORT/src/contrib/benchpkg_1.0.tar.gz" | md5sum | cut -d' ' -f1)
[ "$got" = "$md5" ] || { echo "mirror served a different tarball" >&2; exit 1; }

# --- measure ------------------------------------------------------------------------------------
# Prints: req/s MB/s p99(ms)
measure() {
  local out rps tps p99
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$1")
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  tps=$(awk '/^Transfer\/sec/ {v=$2; u=substr(v, length(v)-1); n=v+0; if (u=="GB") n*=1024; if (u=="KB") n/=1024; printf "%.1f", n}' <<<"$out")
  p99=$(awk '$1=="99%" {v=$2; n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.2f", n}' <<<"$out")
  echo "$rps $tps $p99"
}

echo "mirror bench: wrk -t$THREADS -c$CONNS -d$DURATION x $ROUNDS rounds (nginx and mirror alternate), $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg), index of $((ENTRIES + 1)) packages"
printf '%-5s %-22s %-7s %12s %10s %9s\n' round file server req/s MB/s p99_ms
ratios=$work/ratios
for round in $(seq 1 "$ROUNDS"); do
  for file in PACKAGES.gz benchpkg_1.0.tar.gz; do
    declare -A R=()
    for server in nginx mirror; do
      p=$NGINX_PORT; [ $server = mirror ] && p=$MIRROR_PORT
      read -r rps tps p99 < <(measure "http://127.0.0.1:$p/src/contrib/$file")
      R[$server]="$rps $tps $p99"
      printf '%-5s %-22s %-7s %12s %10s %9s\n' "$round" "$file" "$server" "$rps" "$tps" "$p99"
    done
    read -r nr _ np <<<"${R[nginx]}"
    read -r mr _ mp <<<"${R[mirror]}"
    echo "$file $(awk -v a="$mr" -v b="$nr" 'BEGIN{printf "%.3f", a/b}') $np $mp" >> "$ratios"
  done
done
echo "median over rounds (mirror/nginx throughput; p99 ms nginx, mirror):"
for file in PACKAGES.gz benchpkg_1.0.tar.gz; do
  med() { grep "^$file " "$ratios" | awk -v c="$1" '{print $c}' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  printf '  %-22s ratio %s   p99 nginx %s ms, mirror %s ms\n' "$file" "$(med 2)" "$(med 3)" "$(med 4)"
done
echo "audit lines written: $(wc -l < "$work/audit.jsonl")"
