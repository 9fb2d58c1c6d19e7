#!/usr/bin/env bash
# A worker: join the control plane with the environment's bootstrap token. The CA pin is skipped
# because the token is generated per environment and never leaves the host-only network of this
# throwaway lab; do not copy this into a real cluster. Idempotent.
# Environment: CONTROL_PLANE (host:port), BOOTSTRAP_TOKEN.
set -euo pipefail
: "${CONTROL_PLANE:?}" "${BOOTSTRAP_TOKEN:?}"

say() { printf 'provision[%s]: %s\n' "$(hostname)" "$*"; }

if [ ! -f /etc/kubernetes/kubelet.conf ]; then
    say "joining ${CONTROL_PLANE}"
    for _ in $(seq 60); do
        if kubeadm join "${CONTROL_PLANE}" --token "${BOOTSTRAP_TOKEN}" \
            --discovery-token-unsafe-skip-ca-verification >/var/log/kubeadm-join.log 2>&1; then
            break
        fi
        kubeadm reset -f >/dev/null 2>&1 || true
        sleep 10
    done
    [ -f /etc/kubernetes/kubelet.conf ] || { say "join failed: see /var/log/kubeadm-join.log"; exit 1; }
fi
say "done"
