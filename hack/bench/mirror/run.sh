#!/usr/bin/env bash
# Benchmark: noexit-operator mirror (cache hits) against nginx serving the same files, in the
# same run, with wrk at 64 connections: req/s for PACKAGES.gz, MB/s for a 4 MiB tarball, p99.
# nginx is also the mirror's upstream, so the mirror's cache is filled from it, verified.
#
#   sudo hack/bench/mirror/run.sh              # DURATION=10s CONNS=64 THREADS=2 by default
#
# Needs root only to install nginx-light and wrk when they are missing. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
ENTRIES=${ENTRIES:-2000}

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
  --upstream "http://127.0.0.1:$NGINX_PORT" --cache-dir "$work/cache" \
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

echo "mirror bench: wrk -t$THREADS -c$CONNS -d$DURATION, $(nproc) cores, index of $((ENTRIES + 1)) packages"
printf '%-22s %-7s %12s %10s %9s\n' file server req/s MB/s p99_ms
declare -A R
for file in PACKAGES.gz benchpkg_1.0.tar.gz; do
  for server in nginx mirror; do
    p=$NGINX_PORT; [ $server = mirror ] && p=$MIRROR_PORT
    read -r rps tps p99 < <(measure "http://127.0.0.1:$p/src/contrib/$file")
    R[$file.$server]="$rps $tps $p99"
    printf '%-22s %-7s %12s %10s %9s\n' "$file" "$server" "$rps" "$tps" "$p99"
  done
done
for file in PACKAGES.gz benchpkg_1.0.tar.gz; do
  read -r nr nt np <<<"${R[$file.nginx]}"
  read -r mr mt mp <<<"${R[$file.mirror]}"
  awk -v f="$file" -v nr="$nr" -v mr="$mr" -v nt="$nt" -v mt="$mt" -v mp="$mp" \
    'BEGIN { printf "%-22s mirror/nginx: req/s %.0f%%, MB/s %.0f%%; mirror p99 %s ms\n", f, 100*mr/nr, 100*mt/nt, mp }'
done
echo "audit lines written: $(wc -l < "$work/audit.jsonl")"
