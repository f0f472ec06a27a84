# Sourced by the VM benches.
#
# bench_agent_yaml WORK NAME DESKTOP OUTBOX [GATEWAY_SOURCE]: writes WORK/seed/agent.yaml, the
# agent's config for workspace bench/NAME on QEMU's user-mode network (desktop none or vnc; a
# gateway source is the network the desktop port is opened to).
bench_agent_yaml() {
  local work=$1 name=$2 desktop=$3 outbox=$4 gateway=${5:-}
  mkdir -p "$work/seed"
  {
    printf 'workspace: { project: bench, name: %s }\n' "$name"
    printf 'controlPlane:\n  url: https://api.noexit:8443\n  caFile: /etc/noexit/tls/ca.crt\n'
    printf '  certFile: /etc/noexit/tls/client.crt\n  keyFile: /etc/noexit/tls/client.key\n'
    printf 'egress:\n  resolvers: [10.0.2.3]\n  endpoints: [{ name: controlPlane, address: 10.0.2.2, port: 8443 }]\n'
    [ -z "$gateway" ] || printf '  gatewaySources: [%s]\n' "$gateway"
    printf '  desktopPort: 5901\nmode: vm\ndesktop: %s\noutbox: %s\n' "$desktop" "$outbox"
  } >"$work/seed/agent.yaml"
}

# bench_seed WORK NAME: completes the seed directory WORK/seed (the
# caller has written WORK/seed/agent.yaml) with what images/README.md's boot contract asks for —
# a throwaway CA and a client certificate for workspace bench/NAME (the agent stops at startup
# without them), network.env for QEMU's user-mode network (the host is 10.0.2.2 = api.noexit) —
# and writes the seed ISO WORK/seed.iso (label NOEXITSEED).
bench_seed() {
  local work=$1 name=$2
  mkdir -p "$work/seed/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
    -keyout "$work/ca.key" -out "$work/seed/tls/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
    -addext "subjectAltName=URI:noexit://workspace/bench/$name" -keyout "$work/seed/tls/client.key" \
    -out "$work/client.csr" 2>/dev/null
  openssl x509 -req -in "$work/client.csr" -CA "$work/seed/tls/ca.crt" -CAkey "$work/ca.key" -days 2 \
    -copy_extensions copy -out "$work/seed/tls/client.crt" 2>/dev/null
  printf 'ADDRESS=10.0.2.15/24\nGATEWAY=10.0.2.2\nDNS=10.0.2.3\nHOSTS="10.0.2.2 api.noexit"\n' >"$work/seed/network.env"
  xorriso -as mkisofs -quiet -V NOEXITSEED -J -R -o "$work/seed.iso" "$work/seed" 2>/dev/null
}
