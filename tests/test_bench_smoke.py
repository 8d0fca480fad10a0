"""Smoke test of the benchmark suite: ``bench/run.py --quick`` runs end to end
and writes every field of its JSON report."""

import json
import math
import subprocess
import sys
from pathlib import Path

import os

import pytest

# The run trains every workload briefly with hvae and PyTorch (eager and
# torch.compile'd, whose compilation takes most of it): several minutes here,
# more than the rest of the suite, so it is opt-in.
pytestmark = pytest.mark.skipif(not os.environ.get("HVAE_BENCH_SMOKE"),
                                reason="slow benchmark smoke run: set HVAE_BENCH_SMOKE=1")
pytest.importorskip("torch")

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN = REPO_ROOT / "bench" / "run.py"

sys.path.insert(0, str(REPO_ROOT / "bench"))
import data  # noqa: E402

WORKLOAD_FIELDS = [
    "name", "n_train", "n_test", "test_is_train", "batch_size", "n_threads", "n_params",
    "hvae_epoch_seconds", "peer_epoch_seconds", "hvae_samples_per_s", "peer_samples_per_s",
    "ratio", "hvae_test_elbo", "peer_test_elbo", "hvae_train_elbo", "peer_train_elbo",
    "flops_per_row", "hvae_gflops", "peer_gflops", "foreign_cpu", "gemm_limit",
    "peer_variant", "peer_variants",
]
VARIANT_FIELDS = ["epoch_seconds", "samples_per_s", "train_elbo", "test_elbo", "gflops",
                  "hvae_ratio", "percent_of_limit", "compile_seconds"]
GEMM_FIELDS = ["step_flops", "n_calls", "gemm_step_seconds", "gemm_gflops", "hvae_gflops",
               "peer_gflops", "hvae_percent_of_limit", "peer_percent_of_limit",
               "library_is_mapped"]
MEMORY_FIELDS = ["x_bytes", "rss_after_imports", "rss_after_data", "peak_rss", "ru_maxrss",
                 "overhead_beyond_x"]


def finite_positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    try:
        data.find_fashion_mnist()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    completed = subprocess.run([sys.executable, str(RUN), "--quick", "--json", str(path)],
                               capture_output=True, text=True, timeout=1500)
    assert completed.returncode == 0, completed.stderr
    assert "hvae samples/s" in completed.stdout
    return json.loads(path.read_text())


def test_machine_and_settings(report):
    machine = report["machine"]
    for field in ("cpu_model", "logical_cpus", "blas", "torch", "python", "numpy"):
        assert machine[field], field
    assert report["settings"]["quick"] is True
    assert report["settings"]["n_threads"] == 2


def test_every_workload_has_every_field(report):
    names = [w["name"] for w in report["workloads"]]
    assert names == ["W1", "W2", "W3", "W4"]
    for w in report["workloads"]:
        for field in WORKLOAD_FIELDS:
            assert field in w, (w["name"], field)
        for field in ("hvae_samples_per_s", "peer_samples_per_s", "ratio", "hvae_gflops"):
            assert finite_positive(w[field]), (w["name"], field)
        assert math.isfinite(w["hvae_test_elbo"]) and math.isfinite(w["peer_test_elbo"])
        for field in GEMM_FIELDS:
            assert field in w["gemm_limit"], (w["name"], field)
        assert w["gemm_limit"]["library_is_mapped"]
        assert set(w["peer_variants"]) == {"eager", "compiled"}
        for variant, fields in w["peer_variants"].items():
            for field in VARIANT_FIELDS:
                assert field in fields, (w["name"], variant, field)
            assert finite_positive(fields["samples_per_s"]), (w["name"], variant)
        assert finite_positive(w["peer_variants"]["compiled"]["compile_seconds"])
        # The peer is the faster variant.
        assert w["peer_samples_per_s"] == max(
            v["samples_per_s"] for v in w["peer_variants"].values())
        assert finite_positive(w["gemm_limit"]["hvae_percent_of_limit"])
    assert report["workloads"][0]["test_is_train"]
    # W2's step: (784*512 + 512*256 + 2*256*32) * 2 flops per row forward, three
    # times for every layer but the first, which has no dX.
    w2 = report["workloads"][1]
    products = [784 * 512, 512 * 256, 256 * 32, 256 * 32, 32 * 256, 256 * 512, 512 * 784]
    assert w2["flops_per_row"] == 2 * (3 * sum(products) - products[0])


def test_inference_memory_and_scaling(report):
    for task in ("transform", "score"):
        result = report["inference"][task]
        for field in ("hvae_rows_per_s", "peer_rows_per_s", "ratio"):
            assert finite_positive(result[field]), (task, field)
    for library in ("hvae", "peer"):
        for field in MEMORY_FIELDS:
            assert finite_positive(report["memory"][library][field]), (library, field)
    hvae_memory = report["memory"]["hvae"]
    assert hvae_memory["no_copy_of_x"]
    # Doubling the rows must not grow what fit allocates through Python.
    growth = hvae_memory["tracemalloc_peak"] - hvae_memory["tracemalloc_peak_half_rows"]
    assert growth < hvae_memory["tracemalloc_x_bytes"] / 20
    cells = report["scaling"]["rows_and_layers"]["cells"]
    assert sorted({c["n_layers"] for c in cells}) == [1, 2, 3, 4]
    for cell in cells:
        assert finite_positive(cell["epoch_seconds"])
        assert finite_positive(cell["seconds_per_row_vs_smallest"])
    threads = report["scaling"]["threads"]
    for library in ("hvae", "peer"):
        assert finite_positive(threads[library]["speedup"])
        assert set(threads[library]["epoch_seconds"]) == {"1", "2"}
