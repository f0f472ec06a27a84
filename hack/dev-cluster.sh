#!/usr/bin/env bash
# A live noexit on a real, local control plane (no containers, no root):
#   hack/dev-cluster.sh up      # control plane + chart + controller, webhook and API + examples/
#   . "$(hack/control-plane/control-plane.sh dir)/env"    # KUBECONFIG and PATH (kubectl, helm)
#   kubectl get workspaces -A
#   hack/dev-cluster.sh down
#
# `up`: starts hack/control-plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kwok nodes), installs charts/noexit with the real helm (CRDs, RBAC, the
# ValidatingWebhookConfiguration pointed at the local webhook with webhook.url), then runs
# target/debug/noexit-operator's webhook, API (SQLite) and controller on loopback, each as the
# chart's ServiceAccount for it (kubeconfig impersonation: `as: system:serviceaccount:...`), so
# the chart's RBAC is what they get. The chart's own Deployments get fake pods on the kwok
# nodes (nothing runs in them). Finally `kubectl apply -f examples/` (EXAMPLES=0 skips it).
#
# Settings (environment): EXAMPLES (1), CARGO_BUILD (1: `cargo build -p noexit-operator` first).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
cp=hack/control-plane/control-plane.sh
NS=noexit-system
EXAMPLES=${EXAMPLES:-1}
CARGO_BUILD=${CARGO_BUILD:-1}
operator=$repo/target/debug/noexit-operator

log() { echo "dev-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

wait_until() {
  local bound=$1
  shift
  local deadline=$((SECONDS + bound))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 30000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! grep -qx "$p" "$dir/ports" 2>/dev/null; then
      echo "$p" >>"$dir/ports"
      printf -v "$1" %s "$p"
      return 0
    fi
  done
  die "no free port"
}

# A kubeconfig that acts as ServiceAccount $1 of $NS (the admin certificate may impersonate).
sa_kubeconfig() {
  local sa=$1 out=$dir/sa-$1.kubeconfig
  sed "s|^    user:$|    user:\n      as: system:serviceaccount:$NS:$sa|" "$dir/admin.kubeconfig" >"$out"
  grep -q "as: system:serviceaccount:$NS:$sa" "$out" || die "could not write $out"
  echo "$out"
}

start() {
  local name=$1 kubeconfig=$2
  shift 2
  KUBECONFIG=$kubeconfig POD_NAMESPACE=$NS setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/pids/$name"
}

failed() {
  log "$1; last lines of $dir/logs/$2.log:"
  tail -n 30 "$dir/logs/$2.log" >&2 || true
  exit 1
}

up() {
  command -v openssl >/dev/null || die "openssl is required (hack/install-deps.sh)"
  dir=$("$cp" up)
  # shellcheck source=/dev/null
  . "$dir/env"
  if [ "$CARGO_BUILD" = 1 ]; then
    nice -n 10 cargo build -q -p noexit-operator --bin noexit-operator
  fi
  [ -x "$operator" ] || die "$operator is missing (cargo build -p noexit-operator)"
  # A copy, so that a rebuild while it runs changes nothing under it.
  mkdir -p "$dir/noexit"
  cp "$operator" "$dir/noexit/noexit-operator"
  operator=$dir/noexit/noexit-operator
  if [ -f "$dir/pids/noexit-controller" ] && kill -0 "$(cat "$dir/pids/noexit-controller")" 2>/dev/null; then
    log "noexit already running in $dir"
    return 0
  fi
  local webhook_port api_port metrics_port
  free_port webhook_port
  free_port api_port
  free_port metrics_port

  log "chart charts/noexit (helm $(helm version --short 2>/dev/null))"
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl label namespace "$NS" --overwrite \
    pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/warn=restricted >/dev/null
  helm upgrade --install noexit charts/noexit -n "$NS" \
    --set webhook.url="https://127.0.0.1:$webhook_port/validate" --set audit.ownerSecretName= \
    >"$dir/logs/helm.log" 2>&1 ||
    failed "helm install failed" helm

  mkdir -p "$dir/noexit/webhook" "$dir/noexit/api/data"
  # The site file the chart gives the controller and the webhook (ConfigMap noexit-site).
  kubectl -n "$NS" get configmap noexit-site -o jsonpath='{.data.site\.yaml}' >"$dir/noexit/site.yaml"
  # The controller first: it creates the operator CA (Secret noexit-ca), issues the webhook's
  # serving certificate into noexit-webhook-tls (for 127.0.0.1, where the API server calls it)
  # and sets the caBundle. Revocations wait for the API, which starts below.
  start noexit-controller "$(sa_kubeconfig noexit-controller)" "$operator" controller \
    --site "$dir/noexit/site.yaml" --metrics-addr "127.0.0.1:$metrics_port" \
    --api-url "https://127.0.0.1:$api_port" --identity dev-controller-1 \
    --webhook-secret noexit-webhook-tls --webhook-dns-name 127.0.0.1 --webhook-configuration noexit-webhook
  ready() { curl -sf "http://127.0.0.1:$metrics_port/readyz"; }
  wait_until 60 ready || failed "the controller is not ready" noexit-controller
  caBundle_set() { [ -n "$(kubectl get validatingwebhookconfiguration noexit-webhook -o jsonpath='{.webhooks[0].clientConfig.caBundle}')" ]; }
  wait_until 60 caBundle_set || failed "the controller did not set the webhook's caBundle" noexit-controller
  webhook_tls() {
    kubectl -n "$NS" get secret noexit-webhook-tls -o jsonpath='{.data.tls\.crt}' | base64 -d >"$dir/noexit/webhook/tls.crt" &&
      kubectl -n "$NS" get secret noexit-webhook-tls -o jsonpath='{.data.tls\.key}' | base64 -d >"$dir/noexit/webhook/tls.key" &&
      [ -s "$dir/noexit/webhook/tls.crt" ] && [ -s "$dir/noexit/webhook/tls.key" ]
  }
  wait_until 60 webhook_tls || failed "the controller did not issue the webhook's certificate" noexit-controller

  # The API's serving certificate, from the operator CA the controller created.
  local pki=$dir/noexit/api
  kubectl -n "$NS" get secret noexit-ca -o jsonpath='{.data.ca\.crt}' | base64 -d >"$pki/ca.crt"
  kubectl -n "$NS" get secret noexit-ca -o jsonpath='{.data.ca\.key}' | base64 -d >"$pki/ca.key"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=noexit/CN=127.0.0.1" \
    -keyout "$pki/tls.key" -out "$pki/tls.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$pki/ext"
  openssl x509 -req -in "$pki/tls.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$pki/ext" -out "$pki/tls.crt" 2>/dev/null
  rm -f "$pki/ca.key"
  local db="sqlite:$pki/noexit.db?mode=rwc"
  start noexit-api "$(sa_kubeconfig noexit-api)" "$operator" api \
    --listen "127.0.0.1:$api_port" --tls-cert "$pki/tls.crt" --tls-key "$pki/tls.key" \
    --client-ca "$pki/ca.crt" --database-url "$db" \
    --audit-key "$pki/audit-signing.pem" --data-dir "$pki/data"
  api_up() { curl -sk "https://127.0.0.1:$api_port/healthz"; }
  wait_until 60 api_up || failed "the API did not come up" noexit-api

  # The webhook reads only its certificate (never the CA) and records every review in the
  # same audit log, signed with its own key as writer `webhook`.
  rm -f "$dir/noexit/webhook/audit.pem" "$dir/noexit/webhook/audit.pub"
  "$operator" audit-keygen --private "$dir/noexit/webhook/audit.pem" --public "$dir/noexit/webhook/audit.pub" \
    >/dev/null 2>&1 || failed "audit-keygen failed" noexit-api
  start noexit-webhook "$(sa_kubeconfig noexit-webhook)" "$operator" webhook \
    --listen "127.0.0.1:$webhook_port" --site "$dir/noexit/site.yaml" \
    --tls-cert "$dir/noexit/webhook/tls.crt" --tls-key "$dir/noexit/webhook/tls.key" \
    --database-url "$db" --audit-key "$dir/noexit/webhook/audit.pem" \
    --trusted-user "system:serviceaccount:$NS:noexit-api"
  webhook_up() { curl -sk "https://127.0.0.1:$webhook_port/readyz"; }
  wait_until 60 webhook_up || failed "the webhook is not ready" noexit-webhook

  cat >>"$dir/env" <<EOF
export NOEXIT_DEV_API=https://127.0.0.1:$api_port
export NOEXIT_DEV_WEBHOOK=https://127.0.0.1:$webhook_port/validate
export NOEXIT_DEV_METRICS=http://127.0.0.1:$metrics_port
export NOEXIT_DEV_SITE=$dir/noexit/site.yaml
export NOEXIT_DEV_API_CA=$pki/ca.crt
export NOEXIT_DEV_API_DB=$pki/noexit.db
export NOEXIT_DEV_OPERATOR=$operator
export NOEXIT_DEV_CONTROLLER_KUBECONFIG=$dir/sa-noexit-controller.kubeconfig
EOF
  if [ "$EXAMPLES" = 1 ]; then
    log "kubectl apply -f examples/"
    # Retried while the controller makes the project's namespace and quota, the quota controller
    # first counts Workspaces there, and the webhook's caches catch up with the Project.
    apply_examples() { kubectl apply -f examples/ward-7.yaml; }
    wait_until 180 apply_examples || { kubectl apply -f examples/ward-7.yaml; exit 1; }
  fi
  log "up: . $dir/env  (logs in $dir/logs)"
}

down() {
  "$cp" down "${1:-}"
}

case "${1:-}" in
  up) up ;;
  down) down "${2:-}" ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
