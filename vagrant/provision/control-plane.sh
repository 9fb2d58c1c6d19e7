#!/usr/bin/env bash
# The control plane: kubeadm init with a known bootstrap token (the workers join with it), Calico
# through its operator with native routing (no IP-in-IP or VXLAN: pods' packets cross the
# host-only network as they are, so the agent's uplink capture sees them), and kubectl for the
# vagrant user. Idempotent: a second run only re-applies Calico.
# Environment: NODE_IP, POD_CIDR, NODE_CIDR, BOOTSTRAP_TOKEN, CALICO_VERSION.
set -euo pipefail
: "${NODE_IP:?}" "${POD_CIDR:?}" "${NODE_CIDR:?}" "${BOOTSTRAP_TOKEN:?}" "${CALICO_VERSION:?}"

say() { printf 'provision[%s]: %s\n' "$(hostname)" "$*"; }
export KUBECONFIG=/etc/kubernetes/admin.conf

if [ ! -f /etc/kubernetes/admin.conf ]; then
    say "kubeadm init"
    kubeadm init \
        --apiserver-advertise-address="${NODE_IP}" \
        --pod-network-cidr="${POD_CIDR}" \
        --token="${BOOTSTRAP_TOKEN}" \
        --token-ttl=0 >/var/log/kubeadm-init.log
fi
install -d -o vagrant -g vagrant /home/vagrant/.kube
install -o vagrant -g vagrant -m 0600 /etc/kubernetes/admin.conf /home/vagrant/.kube/config

say "calico ${CALICO_VERSION}"
base="https://raw.githubusercontent.com/projectcalico/calico/${CALICO_VERSION}/manifests"
# create, not apply: the operator's CRDs are too large for client-side apply's annotation.
kubectl get deployment -n tigera-operator tigera-operator >/dev/null 2>&1 \
    || kubectl create -f "${base}/tigera-operator.yaml"
kubectl wait --for=condition=Established --timeout=120s crd/installations.operator.tigera.io
kubectl apply -f - <<YAML
apiVersion: operator.tigera.io/v1
kind: Installation
metadata:
  name: default
spec:
  calicoNetwork:
    bgp: Enabled
    nodeAddressAutodetectionV4:
      cidrs: ["${NODE_CIDR}"]
    ipPools:
      - cidr: ${POD_CIDR}
        encapsulation: None
        natOutgoing: Enabled
        nodeSelector: all()
---
apiVersion: operator.tigera.io/v1
kind: APIServer
metadata:
  name: default
spec: {}
YAML
say "done; workers join with the bootstrap token"
