#!/usr/bin/env bash
# Builds bench/infer_layers.c against the core (csrc/, without the Python
# extension) and hvae's OpenBLAS, with setup.py's flags, and runs it: the
# per-layer speeds of W2's evaluation calls on one thread and their ceiling.
#
#   bench/infer_layers.sh [repeats]
#   HVAE_PROFILE_SRC=/tmp/old bench/infer_layers.sh 9   # another tree's csrc/
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "${HVAE_PROFILE_SRC:-$here/..}"
out=$(mktemp -d "${TMPDIR:-/tmp}/hvae-infer.XXXXXX")
libdir=$(python -c "import scipy_openblas32 as s; print(s.get_lib_dir())")
flags="-std=c11 -O3 -Wall -Wextra -fno-math-errno -fno-trapping-math -pthread -DHVAE_BLAS_PREFIX=scipy_ -Icsrc"
objs=()
for src in csrc/*.c; do
    case $src in csrc/hvaemodule.c) continue ;; esac
    obj="$out/$(basename "$src" .c).o"
    # shellcheck disable=SC2086
    ${CC:-gcc} $flags -c "$src" -o "$obj"
    objs+=("$obj")
done
# shellcheck disable=SC2086
${CC:-gcc} $flags "$here/infer_layers.c" "${objs[@]}" -L"$libdir" -lscipy_openblas \
    -Wl,-rpath,"$libdir" -lm -o "$out/infer_layers"
OPENBLAS_NUM_THREADS=1 "$out/infer_layers" "$@"
[ -n "${HVAE_KEEP:-}" ] && echo "kept $out" || rm -rf "$out"
