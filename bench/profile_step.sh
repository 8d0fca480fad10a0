#!/usr/bin/env bash
# Builds bench/profile_step.c against the core (csrc/, without the Python
# extension) and hvae's OpenBLAS (scipy-openblas32), with the flags setup.py
# uses, and runs it: per-phase times of a training step.
#
#   bench/profile_step.sh [threads] [steps] [latent...] [-- hidden...]
#   bench/profile_step.sh 2 300                 # W2 on two threads
#   bench/profile_step.sh 1 200 32 16 -- 512 256          # W3 on one thread
#   bench/profile_step.sh 1 200 64 32 16 8 4 -- 256 128   # W4
#   HVAE_PROFILE_TRACE=1 bench/profile_step.sh 2 300      # and each parallel region
set -euo pipefail
# HVAE_PROFILE_SRC: another tree's csrc/ (say, an older commit's) to build.
here=$(cd "$(dirname "$0")" && pwd)
cd "${HVAE_PROFILE_SRC:-$here/..}"
out=${HVAE_PROFILE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/hvae-profile.XXXXXX")}
mkdir -p "$out"
libdir=$(python -c "import scipy_openblas32 as s; print(s.get_lib_dir())")
flags="-std=c11 -O3 -Wall -Wextra -fno-math-errno -fno-trapping-math -pthread -DHVAE_BLAS_PREFIX=scipy_ -Icsrc"
# The training loop's zeroing and finite check fused into the optimizer step?
grep -q hvae_optimizer_step_if_finite csrc/internal.h && flags="$flags -DHVAE_FUSED_STEP"
[ -f csrc/parallel.c ] && flags="$flags -DHVAE_HAVE_POOL -DHVAE_POOL_STATS"
# Parts claimed by whichever thread is free (the trace says who ran part 1)?
grep -q part1_by_caller csrc/internal.h && flags="$flags -DHVAE_POOL_CLAIMS"
objs=()
for src in csrc/*.c; do
    case $src in csrc/hvaemodule.c) continue ;; esac
    obj="$out/$(basename "$src" .c).o"
    extra=""
    [ "$src" = csrc/common.c ] && extra="-Dhvae_sgemm=hvae_sgemm_blas"
    # shellcheck disable=SC2086
    ${CC:-gcc} $flags $extra -c "$src" -o "$obj"
    objs+=("$obj")
done
# shellcheck disable=SC2086
${CC:-gcc} $flags "$here/profile_step.c" "${objs[@]}" -L"$libdir" -lscipy_openblas \
    -Wl,-rpath,"$libdir" -lm -o "$out/profile_step"
if [ -z "${HVAE_PROFILE_TRACE:-}" ]; then
    "$out/profile_step" "$@"
    exit
fi
# The trace prints each region's function as an offset from main: name it
# from the binary's symbol table.
"$out/profile_step" "$@" | python3 -c '
import bisect, re, subprocess, sys
table = subprocess.run(["nm", sys.argv[1]], capture_output=True, text=True).stdout.split("\n")
symbols = sorted((int(f[0], 16), f[2]) for f in (l.split() for l in table)
                 if len(f) == 3 and f[1] in "tT")
starts = [a for a, _ in symbols]
main = dict((n, a) for a, n in symbols)["main"]
def name(match):
    return symbols[bisect.bisect_right(starts, main + int(match.group(1))) - 1][1].ljust(24)
for line in sys.stdin:
    sys.stdout.write(re.sub(r"fn=([+-][0-9]+)", name, line))
' "$out/profile_step"
