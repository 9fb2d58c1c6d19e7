#!/usr/bin/env bash
# Bring a Debian 12 host (as root) from nothing to a working nodemesh checkout:
#   1. Debian packages listed in scripts/debian-packages.txt (only the missing ones),
#   2. the kernel-headers link BCC needs when the running kernel ships no headers package,
#   3. bpffs mounted at /sys/fs/bpf,
#   4. a virtualenv .venv on Debian's python3 in which `import bcc` loads Debian's module,
#   5. the project installed editable with its test, dev and bench extras,
#   6. its modules compiled to bytecode (agents read it even where nothing may write it).
# Idempotent: a second run checks and changes nothing, in a few seconds.
#
# `scripts/setup.sh --image` is the same recipe for the container image (Dockerfile): only the
# packages marked "image" in debian-packages.txt, no headers link and no bpffs (the node provides
# both at run time, mounted into the agent's pod), the virtualenv at $NODEMESH_VENV, the project
# installed non-editable without extras, and no apt lists left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=host
case "${1:-}" in
    "") ;;
    --image) MODE=image ;;
    *) printf 'usage: %s [--image]\n' "$0" >&2; exit 2 ;;
esac
VENV="${NODEMESH_VENV:-$ROOT/.venv}"
PY=/usr/bin/python3

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get, kernel headers link and bpffs need it): sudo make $*"
command -v apt-get >/dev/null || die "apt-get not found: nodemesh's setup targets Debian 12 (bookworm)"

# 1. Debian packages ---------------------------------------------------------------------------
# One package per line; a second word "image" marks what the container image needs as well.
mapfile -t wanted < <(awk -v mode="$MODE" \
    '!/^[[:space:]]*(#|$)/ && (mode == "host" || $2 == "image") {print $1}' \
    scripts/debian-packages.txt)
missing=()
for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "$MODE" = image ]; then
    apt-get clean
    rm -rf /var/lib/apt/lists/*
fi

# Steps 2 and 3 prepare the node that runs the agent; an image gets both from its node.
if [ "$MODE" = host ]; then
    # 2. Kernel headers for BCC ------------------------------------------------------------------
    KREL=$(uname -r)
    MOD="/lib/modules/$KREL"
    if [ ! -e "$MOD/build/Makefile" ]; then
        hdr=$(printf '%s\n' /usr/src/linux-headers-*-amd64 | grep -v '\*' | sort -V | tail -n1 || true)
        [ -n "$hdr" ] || die "no kernel headers under /usr/src: apt-get install linux-headers-amd64"
        common=${hdr%-amd64}-common
        mkdir -p "$MOD"
        ln -sfn "$hdr" "$MOD/build"
        ln -sfn "$common" "$MOD/source"
        say "kernel $KREL has no headers package: linked $MOD/build -> $hdr and source -> $common" \
            "(BCC compiles against them; the mesh's programs use only stable UAPI)"
    fi

    # 3. bpffs -------------------------------------------------------------------------------------
    if ! mountpoint -q /sys/fs/bpf; then
        mkdir -p /sys/fs/bpf
        mount -t bpf bpf /sys/fs/bpf
        say "mounted bpffs at /sys/fs/bpf (pinned maps and programs live there)"
    fi
fi

# 4. Virtualenv with Debian's bcc -------------------------------------------------------------------
[ -x "$PY" ] || die "$PY not found: apt-get install python3"
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV on $($PY --version)"
    "$PY" -m venv "$VENV"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -e "$site/bcc" ]; then
    ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
    say "linked Debian's bcc module into the virtualenv ($site/bcc)"
fi

# 5. The project ---------------------------------------------------------------------------------
STAMP="$VENV/.nodemesh-installed"
EXTRAS="test,dev,bench"
if [ "$MODE" = image ]; then
    say "installing nodemesh (non-editable, no extras) into $VENV"
    "$VENV/bin/pip" install -q --no-cache-dir .
elif [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$(cat "$STAMP")" != "$EXTRAS" ]; then
    say "installing nodemesh (editable) with the $EXTRAS extras"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e ".[$EXTRAS]"
    echo "$EXTRAS" > "$STAMP"
fi

# 6. Bytecode of the checkout ---------------------------------------------------------------------
# An editable install leaves the agent's modules in this tree, and pip compiles only what it
# installs into site-packages (all of it has bytecode). Where PYTHONDONTWRITEBYTECODE is set
# nothing ever writes agent/**/__pycache__, so every agent (each lab agent too) compiled every
# module from source at each start: about 0.13 s of CPU and 3 MiB of RSS at import, 0.4 MiB of
# it still held at rest (ARCHITECTURE.md, "Bytecode"). compileall writes bytecode whatever that
# variable says; a module whose bytecode is current (by source mtime and size) is only checked,
# so a second run writes nothing, and an edited module is compiled again at the next setup
# (until then an agent compiles that one from source, as before). The image installs
# non-editable: pip compiled it there.
if [ "$MODE" = host ]; then
    "$VENV/bin/python" -m compileall -q agent || die "compiling agent/ to bytecode failed (above)"
fi
"$VENV/bin/python" -c 'import bcc, agent' || die "import bcc failed in $VENV: reinstall python3-bpfcc"
say "ready ($VENV)"
