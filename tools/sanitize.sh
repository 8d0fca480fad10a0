#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of hvae's C.
#
# 1. Builds tests/c/test_core.c (the C core alone) with the sanitizers and
#    runs it with leak detection on; then with ThreadSanitizer (the thread
#    pool), when the compiler has it.
# 2. Copies the work tree to a scratch directory (the in-place
#    hvae/_core*.so that everyone uses is left alone), builds the extension
#    there with the sanitizers and the plain-C GEMM (HVAE_BLAS=none), and runs
#    a subset of the Python tests against that build, with libasan preloaded
#    (the Python interpreter itself is not instrumented) and Python's own
#    allocator replaced by malloc so that ASan sees every object too.
#
# Any sanitizer report fails the run (UBSan does not recover; ASan stops at
# the first error). CPython leaks at exit by design, so leak detection is off
# for the Python part.
#
#   tools/sanitize.sh                       # the default subset, about 3 minutes
#   tools/sanitize.sh tests/test_model.py   # other pytest arguments
#
# HVAE_SANITIZE_DIR names the scratch directory (kept afterwards when given).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
CC=${CC:-gcc}
PYTHON=${PYTHON:-python}
SAN_FLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"

# The sanitizer runtimes come with GCC on Debian (libgcc-N-dev pulls in
# libasan and libubsan); install them when missing.
libasan=$("$CC" -print-file-name=libasan.so)
if [ ! -e "$libasan" ] || [ ! -e "$("$CC" -print-file-name=libubsan.so)" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        apt-get install -y -qq "libgcc-$("$CC" -dumpversion | cut -d. -f1)-dev" >/dev/null
        libasan=$("$CC" -print-file-name=libasan.so)
    fi
    if [ ! -e "$libasan" ]; then
        echo "sanitize.sh: $CC has no libasan/libubsan (Debian: apt-get install libgcc-12-dev)" >&2
        exit 2
    fi
fi
libasan=$(readlink -f "$libasan")

if [ -n "${HVAE_SANITIZE_DIR:-}" ]; then
    work=$HVAE_SANITIZE_DIR
    rm -rf "$work"
    mkdir -p "$work"
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/hvae-asan.XXXXXX")
    trap 'rm -rf "$work"' EXIT
fi

echo "== C core tests (tests/c/test_core.c) with ASan + UBSan"
sources=$(ls csrc/*.c | grep -v '/hvaemodule\.c$')
# shellcheck disable=SC2086
"$CC" -std=c11 $SAN_FLAGS -DHVAE_NO_BLAS -Icsrc tests/c/test_core.c $sources -pthread -lm \
    -o "$work/test_core"
ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1:abort_on_error=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$work/test_core"

echo "== C core tests with ThreadSanitizer (the thread pool)"
# Without function multiversioning: its ifunc resolvers run before TSan's
# runtime is initialised.
if [ -e "$("$CC" -print-file-name=libtsan.so)" ]; then
    # shellcheck disable=SC2086
    "$CC" -std=c11 -O1 -g -fsanitize=thread -DHVAE_NO_CLONES -DHVAE_NO_BLAS -Icsrc \
        tests/c/test_core.c $sources -pthread -lm -o "$work/test_core_tsan"
    TSAN_OPTIONS=halt_on_error=1:allocator_may_return_null=1 "$work/test_core_tsan"
else
    echo "(skipped: $CC has no libtsan)"
fi

echo "== extension built with ASan + UBSan in $work/tree"
mkdir -p "$work/tree"
tar -C "$repo" --exclude=./.git --exclude=./build --exclude='*.so' --exclude=__pycache__ \
    --exclude=.hypothesis --exclude=.pytest_cache -cf - . | tar -C "$work/tree" -xf -
cd "$work/tree"
HVAE_BLAS=none HVAE_CFLAGS="$SAN_FLAGS" "$PYTHON" setup.py -q build_ext --inplace \
    > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }

export LD_PRELOAD="$libasan"
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONMALLOC=malloc
export PYTHONPATH="$work/tree${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - "$work/tree" <<'PY'
import sys, hvae
assert hvae.__file__.startswith(sys.argv[1]), f"imported {hvae.__file__}, not the sanitized build"
print("hvae from", hvae.__file__, "-", hvae.blas_info())
PY

echo "== Python tests against the sanitized build"
if [ "$#" -eq 0 ]; then
    # The default subset: every test file that drives the C code, less the
    # tests whose large fits take minutes with the plain-C GEMM under ASan
    # (those check threading and timing, which these sanitizers do not).
    set -- tests/test_fuzz.py tests/test_load_hostile.py tests/test_faults.py \
        tests/test_model.py tests/test_model_family.py tests/test_kernels.py \
        tests/test_gradients.py tests/test_elbo_reference.py tests/test_distributed.py \
        -k "not snapshots_of_a_fitting and not estimator_calls_during_its_fit \
and not aborted_by_other_threads \
and not calls_on_a_fitting_model and not across_processes and not another_process \
and not conditional_digit_samples and not concurrent_calls_on_one_model \
and not gil_is_released"
fi
"$PYTHON" -m pytest -q -p no:cacheprovider -x "$@"
