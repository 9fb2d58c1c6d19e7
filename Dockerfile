# syntax=docker/dockerfile:1
# nodemesh: one image for the node agent (`nodemesh agent`) and the mesh CA (`nodemesh ca`).
#
#   docker build -t nodemesh/nodemesh:0.1.0 .          (the tag is pyproject.toml's version)
#
# The image is made by the very script that prepares a developer's machine and CI,
# scripts/setup.sh, in its --image mode: the same Debian packages (those marked "image" in
# scripts/debian-packages.txt), Debian's python3-bpfcc linked into a virtualenv on Debian's
# python3, and the project installed from this tree (non-editable, no test or dev extras). So the
# image runs the package that the tests exercise, and the package list lives in one place.
#
# The source tree is bind-mounted for that one step and never becomes a layer.
# Kernel headers are not in the image: BCC compiles against the node's own, which the DaemonSet
# mounts read-only from /lib/modules and /usr/src (its kernel-headers init container names the
# package to install when they are missing).
# The base is fully qualified so that podman builds it without a short-name search list (as in
# vagrant/). For a reproducible release build, pin it by digest:
#   --build-arg BASE_IMAGE=docker.io/library/debian:bookworm-slim@sha256:<digest>
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim
FROM ${BASE_IMAGE}

ENV NODEMESH_VENV=/opt/nodemesh \
    PATH=/opt/nodemesh/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN --mount=type=bind,target=/src,rw \
    /src/scripts/setup.sh --image \
    && groupadd --system --gid 65532 nodemesh \
    && useradd --system --uid 65532 --gid nodemesh --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin nodemesh

# The CA and the samples run as this user. The agent's DaemonSet sets runAsUser 0 with a small
# set of added capabilities (see daemonset/agent.yaml): Kubernetes gives added capabilities to
# root only.
USER 65532:65532
ENTRYPOINT ["nodemesh"]
CMD ["--help"]
