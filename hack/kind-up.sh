#!/usr/bin/env bash
# A kind cluster with noexit installed, for trying it out and for the e2e suite:
#   hack/kind-up.sh                      # cluster "noexit", Calico, images, audit DB, chart
#   KUBECONFIG=$HOME/.kube/config cargo test -p noexit-e2e --test cluster
#   kind delete cluster --name noexit
# Needs kind, kubectl, helm and podman or docker, and network access for the Calico manifest
# and base images. Not run by CI (no cluster there); see docs/sre.md.
#
# Settings (environment): CLUSTER (noexit), TAG (dev), ENGINE (podman or docker, found),
# CALICO_VERSION (v3.28.2), KUBEVIRT_VERSION (empty: no KubeVirt, pod workspaces only).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-noexit}
TAG=${TAG:-dev}
CALICO_VERSION=${CALICO_VERSION:-v3.28.2}
KUBEVIRT_VERSION=${KUBEVIRT_VERSION:-}
NS=noexit-system
ENGINE=${ENGINE:-$(command -v podman || command -v docker || true)}

need() { command -v "$1" >/dev/null || { echo "kind-up: $1 is required" >&2; exit 1; }; }
need kind
need kubectl
need helm
[ -n "$ENGINE" ] || { echo "kind-up: podman or docker is required" >&2; exit 1; }
step() { printf '\n== %s\n' "$*"; }

step "cluster $CLUSTER (default CNI off: kindnet does not enforce NetworkPolicy)"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s --config - <<KIND
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: true
  podSubnet: 192.168.0.0/16
  serviceSubnet: 10.96.0.0/16
KIND
fi
kubectl config use-context "kind-$CLUSTER"

step "Calico $CALICO_VERSION (enforces the projects' NetworkPolicies)"
kubectl apply --server-side -f "https://raw.githubusercontent.com/projectcalico/calico/$CALICO_VERSION/manifests/calico.yaml"
kubectl -n kube-system rollout status ds/calico-node --timeout=300s
kubectl wait --for=condition=Ready nodes --all --timeout=300s

if [ -n "$KUBEVIRT_VERSION" ]; then
  step "KubeVirt $KUBEVIRT_VERSION (VM workspaces; software emulation on kind)"
  kubectl apply -f "https://github.com/kubevirt/kubevirt/releases/download/$KUBEVIRT_VERSION/kubevirt-operator.yaml"
  kubectl apply -f "https://github.com/kubevirt/kubevirt/releases/download/$KUBEVIRT_VERSION/kubevirt-cr.yaml"
  kubectl -n kubevirt patch kubevirt kubevirt --type merge -p '{"spec":{"configuration":{"developerConfiguration":{"useEmulation":true}}}}'
  kubectl -n kubevirt wait kv kubevirt --for condition=Available --timeout=600s
fi

step "images noexit/operator:$TAG and noexit/agent:$TAG"
"$ENGINE" build -f images/operator/Containerfile -t "localhost/noexit/operator:$TAG" .
"$ENGINE" build -f images/agent/Containerfile -t "localhost/noexit/agent:$TAG" .
archive=$(mktemp -d)
trap 'rm -rf "$archive"' EXIT
for image in operator agent; do
  "$ENGINE" save -o "$archive/$image.tar" "localhost/noexit/$image:$TAG"
  kind load image-archive "$archive/$image.tar" --name "$CLUSTER"
done

step "namespace $NS (Pod Security restricted)"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace "$NS" --overwrite \
  pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/warn=restricted

step "audit database (a throwaway PostgreSQL in namespace noexit-db; use a managed one in production)"
password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
kubectl create namespace noexit-db --dry-run=client -o yaml | kubectl apply -f -
kubectl -n noexit-db get secret postgres >/dev/null 2>&1 ||
  kubectl -n noexit-db create secret generic postgres --from-literal=password="$password"
password=$(kubectl -n noexit-db get secret postgres -o jsonpath='{.data.password}' | base64 -d)
kubectl -n noexit-db apply -f - <<PG
apiVersion: apps/v1
kind: Deployment
metadata: {name: postgres}
spec:
  selector: {matchLabels: {app: postgres}}
  template:
    metadata: {labels: {app: postgres}}
    spec:
      containers:
        - name: postgres
          image: docker.io/library/postgres:16
          env:
            - {name: POSTGRES_DB, value: noexit}
            - {name: POSTGRES_USER, value: noexit}
            - name: POSTGRES_PASSWORD
              valueFrom: {secretKeyRef: {name: postgres, key: password}}
          ports: [{containerPort: 5432}]
          volumeMounts: [{name: data, mountPath: /var/lib/postgresql/data}]
      volumes: [{name: data, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: postgres}
spec:
  selector: {app: postgres}
  ports: [{port: 5432}]
PG
kubectl -n noexit-db rollout status deploy/postgres --timeout=300s
# The owner (migrations, roles: the chart's audit-roles Job) and one role per audit writer, each
# with its own password; and each writer's signing key (the API makes its own on its volume).
db=postgres.noexit-db.svc:5432/noexit
secret() { kubectl -n "$NS" create secret generic "$1" --dry-run=client -o yaml "${@:2}" | kubectl apply -f -; }
secret noexit-audit-db-owner --from-literal=url="postgres://noexit:$password@$db"
secret noexit-audit-db --from-literal=url="postgres://noexit_api:$(openssl rand -hex 16)@$db"
for writer in mirror webhook dns gateway; do
  secret "noexit-audit-db-$writer" --from-literal=url="postgres://noexit_$writer:$(openssl rand -hex 16)@$db"
  if ! kubectl -n "$NS" get secret "noexit-audit-key-$writer" >/dev/null 2>&1; then
    key=$(mktemp)
    openssl genpkey -algorithm ed25519 -out "$key"
    # The public key, for `noexit audit verify --writer-key $writer=…`.
    openssl pkey -in "$key" -pubout -out "audit-$writer.pub"
    secret "noexit-audit-key-$writer" --from-file=key.pem="$key"
    rm -f "$key"
  fi
done

step "chart charts/noexit"
helm upgrade --install noexit charts/noexit -n "$NS" \
  --set image.repository=localhost/noexit/operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set site.agentImage="localhost/noexit/agent:$TAG"
# The controller creates the operator CA (Secret noexit-ca) if it does not exist yet and issues
# the webhook's serving certificate (Secret noexit-webhook-tls), which the webhook pods wait for.
kubectl -n "$NS" rollout status deploy/noexit-controller --timeout=300s
kubectl -n "$NS" rollout status deploy/noexit-webhook --timeout=300s

step "API serving certificate from the operator CA (Secret noexit-api-tls)"
if ! kubectl -n "$NS" get secret noexit-api-tls >/dev/null 2>&1; then
  need openssl
  pki="$archive/pki"
  mkdir -p "$pki"
  kubectl -n "$NS" get secret noexit-ca -o jsonpath='{.data.ca\.crt}' | base64 -d >"$pki/ca.crt"
  kubectl -n "$NS" get secret noexit-ca -o jsonpath='{.data.ca\.key}' | base64 -d >"$pki/ca.key"
  host="noexit-api.$NS.svc"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=noexit/CN=$host" \
    -keyout "$pki/tls.key" -out "$pki/tls.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s,DNS:noexit-api.%s\nextendedKeyUsage=serverAuth\n' "$host" "$NS" >"$pki/ext"
  openssl x509 -req -in "$pki/tls.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 90 -extfile "$pki/ext" -out "$pki/tls.crt" 2>/dev/null
  kubectl -n "$NS" create secret tls noexit-api-tls --cert="$pki/tls.crt" --key="$pki/tls.key"
fi
kubectl -n "$NS" rollout status deploy/noexit-api --timeout=300s
kubectl -n "$NS" rollout status deploy/noexit-mirror --timeout=300s

step "ready"
kubectl get crd projects.noexit.io datasets.noexit.io workspaces.noexit.io workspacerequests.noexit.io
cat <<DONE
Try:   kubectl apply -f examples/ward-7.yaml && kubectl get projects,datasets && kubectl get workspaces -A
Tests: KUBECONFIG=\${KUBECONFIG:-\$HOME/.kube/config} cargo test -p noexit-e2e --test cluster
Down:  kind delete cluster --name $CLUSTER
DONE
