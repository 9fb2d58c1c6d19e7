#!/usr/bin/env bash
# End-to-end check of nodemesh on the vagrant cluster (run from this directory after `vagrant up`):
#   1. build the image on cp from the synced repository and import it into containerd on every
#      node (the manifests use imagePullPolicy IfNotPresent, nothing is pushed anywhere);
#   2. install the mesh (kubectl apply -k daemonset/) and wait for the CA and the agents;
#   3. apply the samples (namespace labelled for the mesh, client, server, policies);
#   4. client -> server across nodes: answered, and on the wire (the server node's host-only NIC)
#      HBONE on 15008 is seen and the plaintext request never is (tcpdump);
#   5. the agent's metrics report the connection as mutual TLS between the two SPIFFE identities,
#      and so does its admin API through the CLI (`nodemesh certs`, `nodemesh connections` run in
#      the agent's container by vagrant/admin_check.py), for a connection held open meanwhile;
#   6. policy: a meshed pod with another identity is refused (AuthorizationPolicy), and once
#      annotated out of the mesh it is refused again, now as plaintext (PeerAuthentication STRICT).
# Exits non-zero at the first failed check, naming it. Leaves the cluster as it is for inspection.
set -euo pipefail
cd "$(dirname "$0")"

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' ../pyproject.toml)
IMAGE="docker.io/nodemesh/nodemesh:${VERSION}"
NODES=(cp w1 w2)
NS=nodemesh-demo

say() { printf '\nsmoke: %s\n' "$*"; }
fail() { printf 'smoke: FAILED: %s\n' "$*" >&2; exit 1; }
on() { local node=$1; shift; vagrant ssh "$node" --no-tty -c "$*"; }
k() { on cp "kubectl $*"; }

say "syncing the repository to the nodes"
for n in "${NODES[@]}"; do vagrant rsync "$n" >/dev/null; done

say "building ${IMAGE} on cp (podman; the Dockerfile runs scripts/setup.sh --image)"
on cp "command -v podman >/dev/null || sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman >/dev/null"
on cp "sudo podman build -q -t ${IMAGE} -f /nodemesh/Dockerfile /nodemesh"
on cp "sudo podman save --format docker-archive -o /var/tmp/nodemesh.tar ${IMAGE}"
for n in "${NODES[@]}"; do
    say "importing the image on ${n}"
    on cp "sudo cat /var/tmp/nodemesh.tar" | on "$n" "sudo ctr -n k8s.io images import -"
done

say "installing the mesh"
k apply -k /nodemesh/daemonset
k -n nodemesh-system rollout status deployment/nodemesh-ca --timeout=180s
k -n nodemesh-system rollout status daemonset/nodemesh-agent --timeout=300s

say "installing the samples"
k apply -k /nodemesh/daemonset/samples
k -n "$NS" rollout status deployment/server --timeout=180s
k -n "$NS" rollout status deployment/client --timeout=180s

client_node=$(k -n "$NS" get pod -l app=client -o "jsonpath='{.items[0].spec.nodeName}'")
server_pod=$(k -n "$NS" get pod -l app=server \
    -o "jsonpath='{range .items[?(@.spec.nodeName!=\"${client_node}\")]}{.metadata.name} {.spec.nodeName} {.status.podIP}{\"\\n\"}{end}'" | head -n1)
read -r server_name server_node server_ip <<<"$server_pod"
[ -n "${server_ip:-}" ] || fail "no server replica on another node than the client (${client_node})"
say "client on ${client_node}, server ${server_name} on ${server_node} (${server_ip})"

fetch() { # fetch POD-SELECTOR URL: exit status of one HTTP GET from inside that pod
    k -n "$NS" exec "$1" -- python3 -c "'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)'" "$2"
}

say "client -> server across nodes, with the wire watched on ${server_node}"
# Only the host-only NIC: the last hop to the server pod (its veth) is plaintext by design.
wire=$(on "$server_node" "ip -o -4 addr show to 192.168.56.0/24 | awk '{print \$2}'")
on "$server_node" "sudo sh -c 'timeout 30 tcpdump -i ${wire} -nn -A \"host ${server_ip} or port 15008\" \
    >/tmp/smoke-wire.txt 2>/dev/null & echo \$! >/tmp/smoke-tcpdump.pid'"
sleep 2
for _ in 1 2 3; do fetch deploy/client "http://${server_ip}:8080/" || fail "client could not reach the server pod"; done
fetch deploy/client "http://server/" || fail "client could not reach the server Service"
sleep 2
on "$server_node" "sudo kill -INT \$(cat /tmp/smoke-tcpdump.pid) 2>/dev/null || true; sleep 1"
on "$server_node" "grep -q '\\.15008[ :]' /tmp/smoke-wire.txt" \
    || fail "no HBONE (port 15008) traffic on ${server_node}: the connection was not tunnelled"
if on "$server_node" "grep -q 'GET / HTTP' /tmp/smoke-wire.txt"; then
    fail "the plaintext request was seen on ${server_node}'s wire"
fi

client_id="spiffe://cluster.local/ns/${NS}/sa/client"
server_id="spiffe://cluster.local/ns/${NS}/sa/server"

say "the agents' metrics report mutual TLS between the two identities"
metrics=$(on "$server_node" "curl -fsS http://127.0.0.1:15020/metrics")
grep 'connection_security_policy="mutual_tls"' <<<"$metrics" \
    | grep "source_principal=\"${client_id}\"" \
    | grep -q "destination_principal=\"${server_id}\"" \
    || fail "no mutual_tls connection client -> server in ${server_node}'s metrics"

say "the admin API, through the nodemesh CLI in the agent on ${server_node}"
agent_pod=$(k -n nodemesh-system get pod -l app.kubernetes.io/name=nodemesh-agent \
    --field-selector "spec.nodeName=${server_node}" -o "jsonpath='{.items[0].metadata.name}'")
admin_check() { # admin_check ARGS...: vagrant/admin_check.py run in that agent's container
    on cp "kubectl -n nodemesh-system exec -i ${agent_pod} -- python3 - $* </nodemesh/vagrant/admin_check.py"
}
admin_check cert "$server_id" || fail "the agent on ${server_node} has no valid certificate for ${server_id}"
# One connection held open while the agent is asked about it.
k -n "$NS" exec deploy/client -- python3 -c \
    "'import socket, sys, time; s = socket.create_connection((sys.argv[1], 8080)); time.sleep(20)'" \
    "$server_ip" &
holder=$!
sleep 4
admin_check mtls "$client_id" "$server_id" \
    || fail "the agent on ${server_node} does not report the client's connection as mutual TLS"
wait "$holder" || true

say "policy: a meshed pod with another identity is refused"
k -n "$NS" delete pod intruder --ignore-not-found --wait=true >/dev/null
# The namespace enforces Pod Security "restricted", hence the security context.
on cp "kubectl -n ${NS} apply -f -" >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: intruder
spec:
  serviceAccountName: default
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    seccompProfile: {type: RuntimeDefault}
  containers:
    - name: intruder
      image: ${IMAGE}
      imagePullPolicy: IfNotPresent
      command: [sleep, infinity]
      securityContext:
        allowPrivilegeEscalation: false
        capabilities: {drop: [ALL]}
YAML
k -n "$NS" wait --for=condition=Ready pod/intruder --timeout=120s >/dev/null
if fetch pod/intruder "http://${server_ip}:8080/"; then
    fail "intruder (service account default) reached the server despite the AuthorizationPolicy"
fi

say "policy: annotated out of the mesh, the intruder is refused as plaintext (STRICT)"
k -n "$NS" annotate pod intruder nodemesh.io/mesh=disabled --overwrite >/dev/null
sleep 3
if fetch pod/intruder "http://${server_ip}:8080/"; then
    fail "a plaintext client reached the server despite PeerAuthentication STRICT"
fi
k -n "$NS" delete pod intruder --wait=false >/dev/null

say "all checks passed"
