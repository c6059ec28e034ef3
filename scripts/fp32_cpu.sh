#!/usr/bin/env bash
# Runs a command as on a CPU kind without bf16 (an AVX2-only x86 CPU), on whatever x86 CPU this is, so
# that the fp32 paths (precision auto -> fp32, fp32 kernels) are tested on a machine that has bf16:
# torch's kernels are capped at AVX2 (ATEN_CPU_CAPABILITY), oneDNN's too (ONEDNN_MAX_CPU_ISA: no AVX-512,
# no AMX), and /proc/cpuinfo is read without the AVX-512 and AMX flags (ftpipe.device reads them), in a
# mount namespace of the command's own. Needs root for the namespace. Example: scripts/fp32_cpu.sh make test
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "error: $0 needs root (a mount namespace hides the CPU's bf16 flags); run it with sudo" >&2
    exit 2
fi
flags=$(mktemp)
trap 'rm -f "$flags"' EXIT
sed -E 's/ (avx512[a-z0-9_]*|amx_[a-z0-9]*)//g' /proc/cpuinfo > "$flags"
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
    unshare --mount --propagation private sh -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' "$flags" "$@"
