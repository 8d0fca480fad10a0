"""Whether this machine can run the MPI tests: shared by the tests that
launch mpirun (tests/test_mpi.py, the README's MPI block in
tests/test_readme.py)."""
import shutil
import subprocess
import sys


def mpi_missing():
    """None when mpirun and mpi4py work, else the reason they don't."""
    if shutil.which("mpirun") is None:
        return "mpirun not found (apt-get install openmpi-bin)"
    probe = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"mpi4py cannot load an MPI library: {probe.stderr.strip()[-200:]}"
    return None
