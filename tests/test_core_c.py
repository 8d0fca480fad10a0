"""Builds and runs the C-only test program tests/c/test_core.c (the core
without Python, plain-C GEMM), as tools/valgrind.sh and tools/sanitize.sh do
under valgrind and the sanitizers."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPILER = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@pytest.mark.skipif(COMPILER is None, reason="no C compiler")
def test_c_core_program(tmp_path):
    sources = sorted(str(p) for p in (ROOT / "csrc").glob("*.c") if p.name != "hvaemodule.c")
    binary = tmp_path / "test_core"
    subprocess.run([COMPILER, "-std=c11", "-O1", "-DHVAE_NO_BLAS", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "c" / "test_core.c"), *sources, "-pthread", "-lm", "-o", str(binary)],
                   check=True, capture_output=True, text=True, timeout=300)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    last = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0 and re.fullmatch(r"\d+ passed, 0 failed", last), run.stdout
