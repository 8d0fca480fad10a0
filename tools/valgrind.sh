#!/usr/bin/env bash
# Runs the C-only test program tests/c/test_core.c under valgrind memcheck.
#
# The core is built from csrc/ (without the Python extension) at -O1 -g with
# the plain-C GEMM (HVAE_NO_BLAS), so that no BLAS internals are checked;
# the run fails on any memcheck error or leaked block, or on a failed test.
#
#   tools/valgrind.sh          # about 10 s
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
    else
        echo "valgrind.sh: valgrind is not installed (Debian: apt-get install valgrind)" >&2
        exit 2
    fi
fi

out=$(mktemp -d "${TMPDIR:-/tmp}/hvae-valgrind.XXXXXX")
trap 'rm -rf "$out"' EXIT
sources=$(ls csrc/*.c | grep -v '/hvaemodule\.c$')
# shellcheck disable=SC2086
"${CC:-cc}" -std=c11 -O1 -g -Wall -Wextra -DHVAE_NO_BLAS -Icsrc \
    tests/c/test_core.c $sources -pthread -lm -o "$out/test_core"
valgrind --error-exitcode=1 --leak-check=full --show-leak-kinds=definite,indirect,possible \
    --errors-for-leak-kinds=definite,indirect,possible --track-origins=yes -q \
    "$out/test_core"
