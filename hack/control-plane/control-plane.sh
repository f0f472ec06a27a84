#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, from the binaries hack/control-plane/build.sh
# builds: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake Nodes on
# which scheduled pods become Running with an IP). No kubelet, no container runtime, no root.
#
#   hack/control-plane/control-plane.sh up      # builds if needed, starts, prints the state dir
#   . "$(hack/control-plane/control-plane.sh dir)/env"   # KUBECONFIG, PATH (kubectl, helm)
#   hack/control-plane/control-plane.sh down    # stops every process it started, removes the dir
#   hack/control-plane/control-plane.sh status
#
# State (certificates, kubeconfigs, etcd data, logs, pids) lives in a temp dir
# (mktemp -d /tmp/noexit-cp.XXXXXX, or $NOEXIT_CP_DIR); the path is kept in
# target/control-plane.dir so `down` finds it. Ports are picked free on 127.0.0.1 at `up`.
#
# The API server runs with --authorization-mode=Node,RBAC, admission plugins including
# PodSecurity and ValidatingAdmissionWebhook, ServiceAccount token signing keys, and client
# certificate authentication (admin: O=system:masters). Services get ClusterIPs from
# 10.96.0.0/16 (nothing routes them: there is no kube-proxy).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
pointer=$repo/target/control-plane.dir
NODES=${NOEXIT_CP_NODES:-2}
NODE_CPU=${NOEXIT_CP_NODE_CPU:-64}
NODE_MEMORY=${NOEXIT_CP_NODE_MEMORY:-512Gi}
NODE_PODS=${NOEXIT_CP_NODE_PODS:-110}

log() { echo "control-plane: $*" >&2; }
die() { log "$*"; exit 1; }

# free_port VAR: a free TCP port on 127.0.0.1 (not listening now, not handed out before).
taken=" "
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 30000))
    case "$taken" in *" $p "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      taken="$taken$p "
      printf -v "$1" %s "$p"
      return 0
    fi
  done
  die "no free port found"
}

# wait_until SECONDS WHAT COMMAND...: poll every 0.2 s, bounded.
wait_until() {
  local bound=$1 what=$2
  shift 2
  local deadline=$((SECONDS + bound))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# start NAME COMMAND...: run in its own session, log to $dir/logs/NAME.log, pid in $dir/pids.
start() {
  local name=$1
  shift
  setsid "$@" >"$dir/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$dir/pids/$name"
}

alive() { [ -f "$dir/pids/$1" ] && kill -0 "$(cat "$dir/pids/$1")" 2>/dev/null; }

failed() {
  log "$1 did not come up; last lines of $dir/logs/$2.log:"
  tail -n 30 "$dir/logs/$2.log" >&2 || true
  stop_all
  exit 1
}

stop_all() {
  [ -d "$dir/pids" ] || return 0
  local name pid extra=()
  # Programs started beside the control plane (hack/dev-cluster.sh puts theirs here too) first,
  # then the control plane in reverse start order, etcd last.
  for pid in "$dir"/pids/*; do
    [ -f "$pid" ] || continue
    case "${pid##*/}" in kwok | kube-* | etcd) ;; *) extra+=("${pid##*/}") ;; esac
  done
  for name in "${extra[@]}" kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
    [ -f "$dir/pids/$name" ] || continue
    pid=$(cat "$dir/pids/$name")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$dir/pids/$name"
  done
}

certs() {
  local d=$dir/pki
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=noexit-control-plane-ca" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  # leaf NAME SUBJECT [SAN]: key + certificate signed by the CA.
  leaf() {
    local name=$1 subj=$2 san=${3:-}
    openssl req -newkey rsa:2048 -nodes -subj "$subj" -keyout "$d/$name.key" -out "$d/$name.csr" 2>/dev/null
    local ext=$d/$name.ext
    if [ -n "$san" ]; then
      printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" >"$ext"
    else
      printf 'extendedKeyUsage=clientAuth\n' >"$ext"
    fi
    openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
      -extfile "$ext" -out "$d/$name.crt" 2>/dev/null
  }
  leaf apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  leaf admin "/O=system:masters/CN=noexit-admin"
  leaf controller-manager "/CN=system:kube-controller-manager"
  leaf scheduler "/CN=system:kube-scheduler"
  # ServiceAccount token signing keys.
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

kubeconfig() {
  local name=$1 user=$2
  cat >"$dir/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: noexit
    cluster:
      server: https://127.0.0.1:$apiserver_port
      certificate-authority: $dir/pki/ca.crt
users:
  - name: $user
    user:
      client-certificate: $dir/pki/$user.crt
      client-key: $dir/pki/$user.key
contexts:
  - name: noexit
    context: {cluster: noexit, user: $user}
current-context: noexit
EOF
}

fake_node() {
  local name=$1
  "${kubectl[@]}" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
    kwok.x-k8s.io/node: fake
  labels:
    kubernetes.io/hostname: $name
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
status:
  allocatable: {cpu: "$NODE_CPU", memory: $NODE_MEMORY, pods: "$NODE_PODS", ephemeral-storage: 10Ti}
  capacity: {cpu: "$NODE_CPU", memory: $NODE_MEMORY, pods: "$NODE_PODS", ephemeral-storage: 10Ti}
EOF
}

# Volumes: no kubelet mounts anything, but pods wait for their PVCs to bind before they are
# scheduled. The default StorageClass uses the controller-manager's in-tree hostPath provisioner
# (--enable-hostpath-provisioner), which only creates PersistentVolume objects here.
storage_class() {
  "${kubectl[@]}" apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/host-path
reclaimPolicy: Delete
volumeBindingMode: Immediate
EOF
}

nodes_ready() {
  [ "$("${kubectl[@]}" get nodes --no-headers 2>/dev/null | grep -cw Ready)" -ge "$NODES" ]
}

up() {
  command -v openssl >/dev/null || die "openssl is required (hack/install-deps.sh)"
  bin=$("$here/build.sh")
  if [ -f "$pointer" ] && [ -d "$(cat "$pointer")/pids" ]; then
    dir=$(cat "$pointer")
    if alive kube-apiserver; then log "already up in $dir"; echo "$dir"; return 0; fi
    stop_all
  fi
  dir=${NOEXIT_CP_DIR:-$(mktemp -d /tmp/noexit-cp.XXXXXX)}
  mkdir -p "$dir/logs" "$dir/pids" "$repo/target"
  echo "$dir" >"$pointer"
  local start_time=$SECONDS
  free_port etcd_port
  free_port etcd_peer_port
  free_port apiserver_port
  free_port kwok_port
  certs
  kubeconfig admin admin
  kubeconfig controller-manager controller-manager
  kubeconfig scheduler scheduler

  start etcd "$bin/etcd" --name noexit --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "noexit=http://127.0.0.1:$etcd_peer_port" \
    --unsafe-no-fsync --log-level warn
  wait_until 30 etcd curl -sf "http://127.0.0.1:$etcd_port/health" || failed etcd etcd

  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$apiserver_port" \
    --endpoint-reconciler-type none \
    --cert-dir "$dir/pki" --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
    --client-ca-file "$dir/pki/ca.crt" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NamespaceLifecycle,LimitRanger,ServiceAccount,PodSecurity,DefaultStorageClass,ResourceQuota,MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$dir/pki/sa.pub" --service-account-signing-key-file "$dir/pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --allow-privileged=false --profiling=false
  wait_until 90 kube-apiserver curl -sf --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" \
    --key "$dir/pki/admin.key" "https://127.0.0.1:$apiserver_port/readyz" || failed kube-apiserver kube-apiserver

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$dir/controller-manager.kubeconfig" --leader-elect=false --secure-port 0 \
    --use-service-account-credentials \
    --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
    --cluster-signing-cert-file "$dir/pki/ca.crt" --cluster-signing-key-file "$dir/pki/ca.key" \
    --enable-hostpath-provisioner --concurrent-gc-syncs 20 --profiling=false \
    --resource-quota-sync-period 10s
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$dir/scheduler.kubeconfig" --leader-elect=false --secure-port 0 --profiling=false
  start kwok "$bin/kwok" --kubeconfig "$dir/admin.kubeconfig" --config "$bin/kwok-stages.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --cidr 10.244.0.0/16 --node-ip 10.244.0.1 --node-lease-duration-seconds 40 \
    --server-address "127.0.0.1:$kwok_port"

  local kubectl=("$bin/kubectl" --kubeconfig "$dir/admin.kubeconfig")
  # The default ServiceAccount (made by the controller-manager) is what pods need to be admitted.
  wait_until 60 default-sa "${kubectl[@]}" get serviceaccount default -n default ||
    failed "kube-controller-manager (no default ServiceAccount)" kube-controller-manager
  local i
  for i in $(seq 1 "$NODES"); do fake_node "kwok-node-$i"; done
  storage_class
  wait_until 60 nodes-ready nodes_ready ||
    failed "kwok (nodes not Ready)" kwok
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
    alive "$name" || failed "$name" "$name"
  done

  cat >"$dir/env" <<EOF
export KUBECONFIG=$dir/admin.kubeconfig
export PATH=$bin:\$PATH
export NOEXIT_CP_DIR=$dir
export NOEXIT_CP_BIN=$bin
EOF
  log "up in $((SECONDS - start_time)) s: API server https://127.0.0.1:$apiserver_port, $NODES kwok nodes; . $dir/env"
  echo "$dir"
}

down() {
  dir=${1:-$( [ -f "$pointer" ] && cat "$pointer" || true)}
  [ -n "$dir" ] && [ -d "$dir" ] || { log "nothing to stop"; return 0; }
  stop_all
  case "$dir" in /tmp/noexit-cp.*) rm -rf "$dir" ;; esac
  rm -f "$pointer"
  log "down"
}

status() {
  dir=$(cat "$pointer" 2>/dev/null) || die "not up"
  local name rc=0
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
    if alive "$name"; then echo "$name running (pid $(cat "$dir/pids/$name"))"; else echo "$name stopped"; rc=1; fi
  done
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down "${2:-}" ;;
  status) status ;;
  dir) cat "$pointer" ;;
  *) echo "usage: $0 up|down [DIR]|status|dir" >&2; exit 2 ;;
esac
