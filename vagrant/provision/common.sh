#!/usr/bin/env bash
# Every node: containerd, kubelet/kubeadm/kubectl of one Kubernetes minor release, the kernel
# headers of the running kernel (the agent's BCC compiles against them, mounted read-only into its
# pod), bpffs, and the kernel settings kubeadm checks. Idempotent.
# Environment (from the Vagrantfile): NODE_IP, K8S_MINOR (e.g. 1.34).
set -euo pipefail
: "${NODE_IP:?}" "${K8S_MINOR:?}"
export DEBIAN_FRONTEND=noninteractive

say() { printf 'provision[%s]: %s\n' "$(hostname)" "$*"; }

say "packages"
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    apt-transport-https ca-certificates curl gpg conntrack socat tcpdump \
    "linux-headers-$(uname -r)" >/dev/null

say "kernel settings"
swapoff -a
sed -i '/\sswap\s/s/^/#/' /etc/fstab
cat >/etc/modules-load.d/kubernetes.conf <<'CONF'
overlay
br_netfilter
CONF
modprobe overlay
modprobe br_netfilter
cat >/etc/sysctl.d/90-kubernetes.conf <<'CONF'
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
CONF
sysctl --system >/dev/null
if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf
fi

say "containerd"
install -d -m 0755 /etc/apt/keyrings
if [ ! -f /etc/apt/keyrings/docker.gpg ]; then
    curl -fsSL https://download.docker.com/linux/debian/gpg | gpg --dearmor -o /etc/apt/keyrings/docker.gpg
fi
echo "deb [signed-by=/etc/apt/keyrings/docker.gpg] https://download.docker.com/linux/debian bookworm stable" \
    >/etc/apt/sources.list.d/docker.list
say "kubernetes ${K8S_MINOR}"
if [ ! -f "/etc/apt/keyrings/kubernetes-${K8S_MINOR}.gpg" ]; then
    curl -fsSL "https://pkgs.k8s.io/core:/stable:/v${K8S_MINOR}/deb/Release.key" \
        | gpg --dearmor -o "/etc/apt/keyrings/kubernetes-${K8S_MINOR}.gpg"
fi
echo "deb [signed-by=/etc/apt/keyrings/kubernetes-${K8S_MINOR}.gpg] https://pkgs.k8s.io/core:/stable:/v${K8S_MINOR}/deb/ /" \
    >/etc/apt/sources.list.d/kubernetes.list
apt-get update -qq
apt-get install -y -qq --no-install-recommends containerd.io kubelet kubeadm kubectl >/dev/null
apt-mark hold kubelet kubeadm kubectl >/dev/null

# kubelet and containerd must agree on the systemd cgroup driver.
containerd config default >/etc/containerd/config.toml
sed -i 's/SystemdCgroup = false/SystemdCgroup = true/' /etc/containerd/config.toml
systemctl restart containerd
systemctl enable --now containerd >/dev/null

# The host-only network carries the cluster traffic; the first NIC is Vagrant's NAT, with the
# same address on every VM.
echo "KUBELET_EXTRA_ARGS=--node-ip=${NODE_IP}" >/etc/default/kubelet
systemctl enable kubelet >/dev/null
say "done"
