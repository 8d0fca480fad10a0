"""Build of hvae's C core and its CPython extension.

BLAS: Debian's OpenBLAS through pkg-config when present (package
libopenblas-dev), else the scipy-openblas32 wheel (a build requirement, and
then a runtime dependency). HVAE_BLAS=system|scipy-openblas32|none forces a
choice; 'none' compiles a slow plain-C GEMM for sanitizer and valgrind builds.
HVAE_CFLAGS adds compiler flags (for example sanitizers).
"""
import glob
import os
import shlex
import shutil
import subprocess

import numpy
from setuptools import Extension, setup

SCIPY_OPENBLAS = "scipy-openblas32==0.3.34.481.3"


def pkg_config_openblas():
    if not shutil.which("pkg-config"):
        return None
    try:
        cflags = subprocess.run(["pkg-config", "--cflags", "openblas"], check=True,
                                capture_output=True, text=True).stdout
        libs = subprocess.run(["pkg-config", "--libs", "openblas"], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"compile": shlex.split(cflags), "link": shlex.split(libs),
            "macros": [], "requires": []}


def scipy_openblas():
    try:
        import scipy_openblas32 as sob
    except ImportError:
        return None
    lib_dir = sob.get_lib_dir()
    # At run time the library sits beside hvae in site-packages; hvae also
    # imports scipy_openblas32 first, which loads it for in-place builds.
    return {"compile": [],
            "link": [f"-L{lib_dir}", f"-l{sob.get_library()}",
                     "-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib"],
            "macros": [("HVAE_BLAS_PREFIX", "scipy_")],
            "requires": [SCIPY_OPENBLAS]}


def find_blas():
    choice = os.environ.get("HVAE_BLAS", "").strip().lower()
    if choice == "none":
        return {"compile": [], "link": [], "macros": [("HVAE_NO_BLAS", "1")],
                "requires": []}
    finders = {"system": [pkg_config_openblas],
               "scipy-openblas32": [scipy_openblas],
               "": [pkg_config_openblas, scipy_openblas]}
    if choice not in finders:
        raise SystemExit(f"HVAE_BLAS must be system, scipy-openblas32 or none; got {choice!r}")
    for finder in finders[choice]:
        found = finder()
        if found:
            return found
    raise SystemExit(
        "hvae needs OpenBLAS and found none: install Debian's libopenblas-dev "
        "(apt-get install libopenblas-dev pkg-config), or the wheel "
        f"'{SCIPY_OPENBLAS}' (pip install {SCIPY_OPENBLAS}) into the build "
        "environment.")


blas = find_blas()
extra_cflags = shlex.split(os.environ.get("HVAE_CFLAGS", ""))

extension = Extension(
    "hvae._core",
    sources=sorted(glob.glob("csrc/*.c")),
    depends=sorted(glob.glob("csrc/*.h")),
    include_dirs=["csrc", numpy.get_include()],
    define_macros=blas["macros"],
    extra_compile_args=["-std=c11", "-O3", "-Wall", "-Wextra", "-fno-math-errno", "-fno-trapping-math",
                        "-fvisibility=hidden", "-pthread"] + blas["compile"] + extra_cflags,
    extra_link_args=blas["link"] + ["-pthread"] + extra_cflags,
)

setup(
    ext_modules=[extension],
    install_requires=["numpy>=1.23", "scikit-learn>=1.6", "tqdm>=4.60"] + blas["requires"],
)
