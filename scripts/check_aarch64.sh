#!/usr/bin/env bash
# Check the runtime on an arm64 (aarch64) CPU, as a Jetson or another arm64 edge box runs it, under qemu-user
# emulation on an x86-64 host. Not part of the pytest suite (it needs root and takes tens of minutes the first time).
#
#   sudo scripts/check_aarch64.sh [--root DIR] [--out DIR] [--python PY] [--cpu MODEL] [--ca-bundle FILE]
#                                 [--rebuild-root] [--rebuild-engines]
#
# 1. an arm64 Debian bookworm root (mmdebstrap --arch=arm64, run through qemu-user-static), built once and reused;
# 2. in it, a venv with only the runtime installed from PyPI's aarch64 wheels: `pip install .` of a copy of this
#    repository (the base install: numpy, onnxruntime, tokenizers, pillow; no torch);
# 3. on the host, the onnx, onnx-int8 and onnx-int4 folders of models/demo (`python -m export.build`, reused when
#    their manifest.json exists) and the README quick start's runtime commands on each folder;
# 4. the same commands in the arm64 root, on copies of the same folders and images, run from a folder with the same
#    relative paths (so printed image paths agree), every stdout compared with the host's.
# Prints a table folder x task (identical / differs / failed) and exits 1 on any difference, with the diffs shown.
#
# Environment (or the options above): AARCH64_ROOT (default ~/.cache/blip2-edge/aarch64-root), AARCH64_OUT (results,
# default build/check_aarch64 in the repository), PYTHON (host python with the export extra, default python3),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), MMDEBSTRAP_MODE (default auto), TARGETS (default
# "onnx onnx-int8 onnx-int4"), AARCH64_CA_BUNDLE (CA certificates pip in the root trusts, for a network behind a
# TLS-inspecting proxy; default: the host's PIP_CERT, REQUESTS_CA_BUNDLE or SSL_CERT_FILE where one is set, else the
# root's own ca-certificates), AARCH64_CPU (the CPU qemu emulates, QEMU_CPU: default cortex-a76, ARMv8.2-A with
# dotprod and fp16 like a Jetson Orin's Cortex-A78AE or a Raspberry Pi 5; `max` adds SVE, i8mm and the rest;
# `qemu-aarch64-static -cpu help` lists them).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${AARCH64_ROOT:-$HOME/.cache/blip2-edge/aarch64-root}"
OUT="${AARCH64_OUT:-$REPO/build/check_aarch64}"
PYTHON="${PYTHON:-python3}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
MODE="${MMDEBSTRAP_MODE:-auto}"
TARGETS="${TARGETS:-onnx onnx-int8 onnx-int4}"
CPU="${AARCH64_CPU:-cortex-a76}"
CA_BUNDLE="${AARCH64_CA_BUNDLE:-${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-}}}}"
SUITE=bookworm
REBUILD_ROOT=0
REBUILD_ENGINES=0
BINFMT_FIX=1
ARGS="$*"

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --python) PYTHON="$2"; shift 2 ;;
        --ca-bundle) CA_BUNDLE="$2"; shift 2 ;;
        --cpu) CPU="$2"; shift 2 ;;
        --rebuild-root) REBUILD_ROOT=1; shift ;;
        --rebuild-engines) REBUILD_ENGINES=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
ROOT="$(realpath -m "$ROOT")"
OUT="$(realpath -m "$OUT")"

# Where the repository, the engines and the images go inside the root. The commands run in RUN_IN_ROOT, which holds
# examples/ and engines/ but no source tree, so `python -m runtime` imports the installed package, not a copy.
SRC_IN_ROOT=/opt/blip2-edge/src
VENV_IN_ROOT=/opt/blip2-edge/venv
RUN_IN_ROOT=/opt/blip2-edge/run
CA_IN_ROOT=/opt/blip2-edge/ca-bundle.crt
IN_ROOT_ENV=()   # extra VAR=value for the commands in the root (set in phase 2: the CA bundle)

T0=$(date +%s)
PHASE_NAMES=()
PHASE_SECS=()
phase_start() { PHASE=$1; PHASE_T0=$(date +%s); echo; echo "=== [$(date +%H:%M:%S)] $PHASE"; }
phase_end() {
    local s=$(( $(date +%s) - PHASE_T0 ))
    PHASE_NAMES+=("$PHASE"); PHASE_SECS+=("$s")
    echo "=== $PHASE: ${s}s"
}
die() { echo "error: $*" >&2; exit 1; }

# Runs a command in the arm64 root: a private mount namespace (proc and dev mounted inside the root, gone when the
# command exits, also on failure), then chroot with a clean environment. The host's qemu-aarch64 binfmt handler runs
# the arm64 binaries, emulating the CPU model QEMU_CPU names (qemu-user reads it from each process's environment).
# /sys is deliberately not mounted: with both /sys and /proc there, onnxruntime's cpuinfo finds the CPU list in /sys
# but reads the host's x86 /proc/cpuinfo (qemu-user 7.2 passes it through for arm64) and `import onnxruntime`
# segfaults (exit 139). Without /sys cpuinfo gives up with a warning, and ONNX Runtime takes the CPU features
# from the auxiliary vector (HWCAP), which qemu sets from the emulated CPU model.
in_root() {
    QEMU_CPU="$CPU" unshare --mount --propagation private --fork -- /bin/sh -ec '
        r=$1; shift
        mount -t proc proc "$r/proc"
        mount --rbind /dev "$r/dev"
        exec chroot "$r" /usr/bin/env -i HOME=/root LC_ALL=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
    ' in_root "$ROOT" "QEMU_CPU=$CPU" "${IN_ROOT_ENV[@]}" "$@"
}

# ------------------------------------------------------------------------------------------------ 0. host checks
phase_start "host checks"
[ "$(id -u)" = 0 ] || die "run as root (chroot and mounts in the arm64 root need it): sudo $0 $ARGS"
missing=()
for tool in unshare chroot realpath diff; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[ ${#missing[@]} -eq 0 ] || die "missing host tools: ${missing[*]} (apt-get install -y util-linux coreutils diffutils)"
HOST_ARCH=$(uname -m)
if [ "$HOST_ARCH" != aarch64 ]; then
    need_apt=()
    command -v qemu-aarch64-static >/dev/null || need_apt+=(qemu-user-static)
    command -v update-binfmts >/dev/null || need_apt+=(binfmt-support)
    if [ ! -x "$ROOT/usr/bin/python3" ] || [ $REBUILD_ROOT = 1 ]; then
        command -v mmdebstrap >/dev/null || need_apt+=(mmdebstrap)
    fi
    [ ${#need_apt[@]} -eq 0 ] || die "missing host packages: ${need_apt[*]}
  install them with: apt-get install -y mmdebstrap qemu-user-static binfmt-support"
    BINFMT=/proc/sys/fs/binfmt_misc/qemu-aarch64
    if [ ! -e "$BINFMT" ]; then
        [ -e /proc/sys/fs/binfmt_misc/register ] && how="" \
            || how="mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc && "
        die "no qemu-aarch64 binfmt handler registered ($BINFMT missing): arm64 binaries cannot run here.
  register it with: ${how}update-binfmts --enable qemu-aarch64
  (or: systemctl restart systemd-binfmt; in a container, on the host: docker run --privileged --rm tonistiigi/binfmt --install arm64)"
    fi
    head -1 "$BINFMT" | grep -q enabled || die "the qemu-aarch64 binfmt handler is disabled: update-binfmts --enable qemu-aarch64"
    echo "binfmt: $(tr '\n' ' ' < "$BINFMT")"
    # Without the F (fix-binary) flag the kernel opens the interpreter inside the chroot: put it there (below).
    BINFMT_INTERP=$(sed -n 's/^interpreter //p' "$BINFMT")
    BINFMT_FIX=0; sed -n 's/^flags: //p' "$BINFMT" | grep -q F && BINFMT_FIX=1
fi
"$PYTHON" -c 'import torch, onnx, onnxruntime' 2>/dev/null \
    || die "$PYTHON lacks the export extra (torch, onnx, onnxruntime): pip install torch==2.13.0 -e \".[export]\", or --python PY"
echo "repo $REPO; root $ROOT; results $OUT; host $HOST_ARCH, $("$PYTHON" --version 2>&1)"
phase_end

# ------------------------------------------------------------------------------------------------ 1. arm64 root
phase_start "arm64 root (mmdebstrap $SUITE)"
ROOT_OK="$ROOT/.blip2-edge-root-ok"
if [ $REBUILD_ROOT = 1 ] && [ -e "$ROOT" ]; then echo "removing $ROOT (--rebuild-root)"; rm -rf --one-file-system "$ROOT"; fi
if [ -e "$ROOT_OK" ]; then
    echo "reusing $ROOT (built $(cat "$ROOT_OK")); --rebuild-root to build it again"
else
    [ ! -e "$ROOT" ] || die "$ROOT exists but is not a finished root (no $(basename "$ROOT_OK")): remove it or use --rebuild-root"
    mkdir -p "$(dirname "$ROOT")"
    PARTIAL="$ROOT.partial"
    rm -rf --one-file-system "$PARTIAL"
    # The variant apt (Essential + apt) and the packages the check needs, nothing else.
    mmdebstrap --mode="$MODE" --arch=arm64 --variant=apt \
        --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$PARTIAL" "$MIRROR"
    date -u +%Y-%m-%dT%H:%M:%SZ > "$PARTIAL/.blip2-edge-root-ok"
    mv "$PARTIAL" "$ROOT"
fi
if [ "$HOST_ARCH" != aarch64 ] && [ $BINFMT_FIX = 0 ]; then
    echo "binfmt handler without the F flag: copying qemu-aarch64-static to $BINFMT_INTERP inside the root"
    mkdir -p "$ROOT$(dirname "$BINFMT_INTERP")"
    cp -L "$(command -v qemu-aarch64-static)" "$ROOT$BINFMT_INTERP"
fi
ROOT_ARCH=$(in_root uname -m) || die "cannot run a program in $ROOT (see the error above)"
[ "$ROOT_ARCH" = aarch64 ] || die "uname -m in the root says $ROOT_ARCH, not aarch64"
echo "in the root: $(in_root /bin/sh -c '. /etc/os-release; echo "$PRETTY_NAME"'), $(in_root python3 --version), uname -m $ROOT_ARCH"
phase_end

# ------------------------------------------------------------------------------------------------ 2. runtime install
phase_start "runtime install in the root (venv, pip install . from PyPI's aarch64 wheels)"
if [ -n "$CA_BUNDLE" ]; then
    [ -f "$CA_BUNDLE" ] || die "CA bundle $CA_BUNDLE is not a file (--ca-bundle / AARCH64_CA_BUNDLE)"
    echo "pip in the root trusts the CA certificates of $CA_BUNDLE (copied to $CA_IN_ROOT)"
    mkdir -p "$ROOT$(dirname "$CA_IN_ROOT")"
    cp -L "$CA_BUNDLE" "$ROOT$CA_IN_ROOT"
    IN_ROOT_ENV=("PIP_CERT=$CA_IN_ROOT" "SSL_CERT_FILE=$CA_IN_ROOT" "REQUESTS_CA_BUNDLE=$CA_IN_ROOT")
fi
rm -f "$ROOT/etc/resolv.conf"   # never write through a link in the root onto a host file
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
rm -rf "$ROOT$SRC_IN_ROOT"
mkdir -p "$ROOT$SRC_IN_ROOT"
# The repository's files as git sees them (tracked and untracked, not ignored: no engines/, checkpoints/, build/).
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$REPO" ls-files -z --cached --others --exclude-standard \
        | (cd "$REPO" && xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
        | tar -C "$REPO" --null -T - -cf - | tar -C "$ROOT$SRC_IN_ROOT" -xf -
else
    tar -C "$REPO" --exclude=./engines --exclude=./checkpoints --exclude=./build --exclude=./.git -cf - . \
        | tar -C "$ROOT$SRC_IN_ROOT" -xf -
fi
[ -x "$ROOT$VENV_IN_ROOT/bin/python" ] || in_root python3 -m venv "$VENV_IN_ROOT"
# Binary wheels only (nothing compiled under emulation; a package without an aarch64 wheel fails here, as it would
# on the device); the build backend (setuptools) comes as a wheel too. Only the base install: no extras.
in_root "$VENV_IN_ROOT/bin/pip" install --disable-pip-version-check --no-input --only-binary=:all: \
    --upgrade "$SRC_IN_ROOT"
in_root "$VENV_IN_ROOT/bin/pip" list --disable-pip-version-check --format=freeze
phase_end

# ------------------------------------------------------------------------------------------------ 3. engines (host)
phase_start "engine folders on the host (export.build: $TARGETS)"
for t in $TARGETS; do
    d="$REPO/engines/demo/$t"
    if [ -e "$d/manifest.json" ] && [ $REBUILD_ENGINES = 0 ]; then
        echo "reusing $d (--rebuild-engines to build it again)"
        continue
    fi
    s=$(date +%s)
    (cd "$REPO" && PYTHONPATH="$REPO" "$PYTHON" -m export.build --model models/demo --target "$t")
    echo "built $d in $(( $(date +%s) - s ))s"
done
phase_end

# The quick start's runtime commands (README.md), one file per task; run the same way on both sides. The image list
# is expanded in C collation inside the folder the commands run in, so the order and the printed paths agree.
TASKS="caption ask caption-qformer retrieve"
mkdir -p "$OUT"
cat > "$OUT/tasks.sh" <<'EOF'
#!/bin/sh
# usage: tasks.sh PYTHON RESULTS_DIR TARGET...   (run in a folder holding examples/ and engines/demo/<target>/)
set -u
py=$1; res=$2; shift 2
LC_ALL=C; export LC_ALL
for t in "$@"; do
    f=engines/demo/$t
    mkdir -p "$res/$t"
    run() {   # run TASK ARGS...: stdout to TASK.out, stderr to TASK.err, exit code and seconds to TASK.rc / TASK.secs
        task=$1; shift
        s=$(date +%s)
        "$py" -m runtime "$@" > "$res/$t/$task.out" 2> "$res/$t/$task.err"
        echo $? > "$res/$t/$task.rc"
        echo $(( $(date +%s) - s )) > "$res/$t/$task.secs"
        echo "  $t $task: exit $(cat "$res/$t/$task.rc"), $(cat "$res/$t/$task.secs")s"
    }
    run caption caption --engines "$f" examples/*.png
    run ask ask --engines "$f" --prompt "Question: what color is the circle? Answer:" examples/blue_circle_left.png
    run caption-qformer caption --engines "$f" --decoder qformer examples/*.png
    run retrieve retrieve --engines "$f" --text "a blue circle on the left" --k 2 examples/*.png
done
"$py" -c 'import platform, runtime, numpy, onnxruntime, tokenizers, PIL
print(platform.machine(), "python", platform.python_version(), "numpy", numpy.__version__, "onnxruntime",
      onnxruntime.__version__, "tokenizers", tokenizers.__version__, "pillow", PIL.__version__, "runtime from",
      runtime.__file__)' > "$res/versions.txt" 2> "$res/versions.err" || echo "(versions: exit $?)" >> "$res/versions.txt"
exit 0   # each command's exit code is in its .rc file; the comparison reports failures
EOF

# ------------------------------------------------------------------------------------------------ 4. host runs
phase_start "runtime commands on the host"
rm -rf "$OUT/host" "$OUT/aarch64"
# shellcheck disable=SC2086
(cd "$REPO" && PYTHONPATH="$REPO" sh "$OUT/tasks.sh" "$PYTHON" "$OUT/host" $TARGETS)
cat "$OUT/host/versions.txt"
phase_end

# ------------------------------------------------------------------------------------------------ 5. arm64 runs
phase_start "runtime commands in the arm64 root (qemu, emulated CPU $CPU)"
rm -rf "$ROOT$RUN_IN_ROOT"
mkdir -p "$ROOT$RUN_IN_ROOT/engines/demo"
cp -a "$REPO/examples" "$ROOT$RUN_IN_ROOT/"
for t in $TARGETS; do cp -a "$REPO/engines/demo/$t" "$ROOT$RUN_IN_ROOT/engines/demo/"; done
cp "$OUT/tasks.sh" "$ROOT$RUN_IN_ROOT/tasks.sh"
# shellcheck disable=SC2086
in_root /bin/sh -c "cd $RUN_IN_ROOT && sh tasks.sh $VENV_IN_ROOT/bin/python $RUN_IN_ROOT/results $TARGETS" \
    || echo "warning: the commands in the root exited $? (each command's exit code is compared below)"
cp -a "$ROOT$RUN_IN_ROOT/results" "$OUT/aarch64"
cat "$OUT/aarch64/versions.txt"
phase_end

# ------------------------------------------------------------------------------------------------ 6. compare
phase_start "compare"
status=0
diffs=""
table=$(printf '%-10s' folder; for k in $TASKS; do printf ' | %-16s' "$k"; done; echo)
table+=$'\n'$(printf '%-10s' ----------; for k in $TASKS; do printf ' | %-16s' ----------------; done)
for t in $TARGETS; do
    row=$(printf '%-10s' "$t")
    for k in $TASKS; do
        h="$OUT/host/$t/$k"; a="$OUT/aarch64/$t/$k"
        hrc=$(cat "$h.rc" 2>/dev/null || echo missing); arc=$(cat "$a.rc" 2>/dev/null || echo missing)
        if [ "$hrc" != 0 ] || [ "$arc" != 0 ]; then
            cell="failed (${hrc}/${arc})"; status=1
            diffs+=$'\n'"--- $t $k: exit host $hrc, aarch64 $arc"$'\n'"host stderr:"$'\n'"$(tail -20 "$h.err" 2>/dev/null)"
            diffs+=$'\n'"aarch64 stderr:"$'\n'"$(tail -20 "$a.err" 2>/dev/null)"
        elif d=$(diff -u --label "host/$t/$k.out" --label "aarch64/$t/$k.out" "$h.out" "$a.out"); then
            cell=identical
        else
            cell=differs; status=1
            diffs+=$'\n'"$d"
        fi
        row+=$(printf ' | %-16s' "$cell")
    done
    table+=$'\n'"$row"
done
{ echo "host $(cat "$OUT/host/versions.txt")"
  echo "root $(cat "$OUT/aarch64/versions.txt"), qemu-user emulating $CPU"
  echo; echo "$table"; } > "$OUT/summary.txt"
echo "$table"
phase_end

echo
echo "=== phases"
for i in "${!PHASE_NAMES[@]}"; do printf '%6ss  %s\n' "${PHASE_SECS[$i]}" "${PHASE_NAMES[$i]}"; done
printf '%6ss  total\n' "$(( $(date +%s) - T0 ))"
echo
echo "per command, host / aarch64 seconds:"
for t in $TARGETS; do for k in $TASKS; do
    printf '  %-10s %-16s %5s / %5s\n' "$t" "$k" "$(cat "$OUT/host/$t/$k.secs" 2>/dev/null || echo -)" \
        "$(cat "$OUT/aarch64/$t/$k.secs" 2>/dev/null || echo -)"
done; done
echo
echo "$table"
echo "results: $OUT (host/, aarch64/: stdout .out, stderr .err, exit code .rc per folder and task)"
if [ $status != 0 ]; then
    echo
    echo "=== differences"
    echo "$diffs"
    echo
    echo "FAILED: the aarch64 runtime's output differs from the host's (above)"
    exit 1
fi
echo "OK: every output on aarch64 is identical to the host's"
