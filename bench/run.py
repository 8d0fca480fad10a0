"""hvae against its PyTorch peer on the benchmark workloads W1..W4.

Usage::

    python bench/run.py [--quick] [--workloads W1 W2 ...] [--epochs N]
                        [--warmup N] [--threads K] [--json PATH]
                        [--wait-quiet SECONDS] [--retry-noisy N]

Prints a table and writes every number to JSON (default
bench/results/latest.json). What is measured, and how:

training
    For each workload, an ``hvae.Model`` and two ``TorchHVAE`` peers with
    the same initial parameters (hvae's, copied by name), trained in this
    one process with Adam (lr 1e-3, PyTorch's other defaults, which hvae
    shares), float32, the workload's batch size and the same thread count
    (``model.n_threads`` for hvae, ``torch.set_num_threads`` for the peer).
    The peer is PyTorch at its fastest honest form (``peer_torch.Trainer``:
    fused heads, fused Adam, buffers filled in place), once eager and once
    with its loss through ``torch.compile`` (default mode; compiled for
    both batch shapes before any epoch, in an empty on-disk compile cache,
    and the seconds reported apart). Epochs alternate: a warm-up epoch of
    each, then hvae, eager, compiled, hvae, eager, compiled, ... Each hvae
    epoch is one ``Model.fit(X, n_epochs=1, ...)`` call (its optimizer state
    persists across calls), each peer epoch one ``Trainer.epoch`` call,
    timed with ``time.perf_counter`` around the call. samples/s = training
    rows / median epoch seconds; "the peer" is the faster of eager and
    compiled on that workload, and ratio = hvae samples/s / the peer's
    samples/s (> 1: hvae faster). Test ELBO after the same epochs: hvae
    ``Model.elbo(X_test).mean()``, the peer ``score_samples(X_test).mean()``;
    both are single-sample estimates with their own noise. W1 (digits) has
    no test split: its "test" ELBO is on the training data. ``--no-compile``
    trains the eager peer only.
GEMM limit
    The FLOPs of a training step's matrix products (forward 2*B*in*out per
    dense layer, heads included; backward 2*B*in*out for every dW and for
    every dX except the layer reading x, whose dX hvae skips) over the time
    of exactly those ``scipy_cblas_sgemm`` calls (hvae's shapes, transposes,
    alpha/beta and order, see csrc/linear.c and csrc/model.c), run back to
    back via ctypes through the OpenBLAS hvae itself uses, at the same
    thread count (every call on K threads, and hvae's own policy of one
    thread for small products; the faster counts), best of 20 short blocks.
    hvae's achieved rate is the epoch's FLOPs over the median epoch time, so
    "% of GEMM limit" is the share of the epoch the products alone would
    take; the rest is everything else (activations, losses, Adam, row
    gathering, thread wake-ups). The peer's rate uses the same FLOP count.
inference
    Rows/s of hvae's ``Model.encode`` and ``Model.elbo`` against the peer's
    ``transform`` and ``score_samples`` (under inference_mode, the peer's
    default 1024-row chunks), eager and through
    ``peer_torch.compile_inference`` (compiled before timing), on W2's
    10000 test rows; medians of 3 interleaved repeats after a warm-up on
    1000 rows; the faster peer variant per call is the peer. Each rate is also
    given in GFLOP/s (the matrix-product FLOPs of a row: the encoder's
    dense layers for transform, every dense layer for score) and as a
    percentage of the machine's peak, with what 3x the peer would need.
machine peak
    The single-precision GEMM rate of this machine: a large square product
    (n = 4096; 2048 with --quick) through hvae's OpenBLAS
    (``scipy_cblas_sgemm``) and through the peer's BLAS (``torch.mm``, MKL)
    on 1 and on K threads, best of 5 each; the faster of the two is the
    peak, the ceiling for any float32 matrix-product code here, hvae's or
    the peer's.
memory
    A fresh subprocess per library loads W2's training X from a .npy file
    (no transient copy), then fits one epoch. Reported: X bytes, RSS after
    the imports (before X), RSS after loading X, peak RSS (VmHWM from
    /proc/self/status; getrusage's ru_maxrss is recorded too, but in a
    child it includes the parent's RSS at spawn time), and overhead =
    peak - RSS after imports - X bytes, i.e. what fitting adds beyond the
    interpreter, the libraries and the data themselves. Fits on 5000- and
    10000-row views of X under tracemalloc show whether any NumPy-level copy
    of X is made: a copy would grow the traced peak with the rows; a
    fixed-size allocation does not.
mpi (hvae only)
    W2 trained data-parallel by ``mpirun -n P python bench/mpi.py`` for P = 1
    and 2, one BLAS thread per process, global batch 128: samples/s (median
    epoch), the time a rank spends in the per-step reductions (waiting for
    the slower rank included), and one Allreduce of the gradient buffer
    alone after a barrier, times the steps, as the communication share.
    Skipped when mpirun or mpi4py is missing.
scaling (hvae only)
    Epoch time on the first 10k/30k/60k rows of W2's data for T = 1..4
    (W2's hidden dims, latent dims (32,), (32, 16), (32, 16, 8),
    (32, 16, 8, 4)); and the speedup of 2 threads over 1 on W2 (hvae and
    the peer, on a 20k-row subset, interleaved).

Other processes on the machine distort every timing, badly so for two
OpenBLAS or OpenMP threads on two cores (a thread that loses its core stalls
its partner at every barrier). Each measurement records the share of the
machine's CPU time other processes used while it ran (``foreign_cpu``, from
/proc/stat minus this process's CPU time). ``--wait-quiet S`` waits up to S
seconds for a quiet machine before each phase (and, with --retry-noisy,
before each measurement); ``--retry-noisy N`` repeats up to N measurements
per cell that ran while others used >= 15% of the CPUs (training repeats
whole hvae+peer epoch pairs, so both still train for the same number of
epochs). Recommended on a shared machine:
``python bench/run.py --wait-quiet 120 --retry-noisy 4``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (str(REPO_ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import hvae  # noqa: E402

import data  # noqa: E402

DEFAULT_JSON = BENCH_DIR / "results" / "latest.json"
QUICK_JSON = BENCH_DIR / "results" / "quick.json"  # keeps smoke runs off the real results
LEARNING_RATE = 1e-3
SEED = 0
SCALING_LATENT_DIMS = ((32,), (32, 16), (32, 16, 8), (32, 16, 8, 4))
# The peer's forms: eager PyTorch, and its loss through torch.compile (see
# peer_torch.Trainer); the faster one per workload is "the peer".
PEER_VARIANTS = ("eager", "compiled")
PEER_COMPILE_MODE = None  # torch.compile's default mode

# Sizes of the --quick smoke run: tiny subsets, one timed epoch.
QUICK = dict(n_train=256, n_test=128, scaling_rows=(256, 512), thread_rows=256,
             memory_rows=2048, tracemalloc_rows=1024, gemm_steps=5, gemm_repeats=2,
             inference_repeats=1, mpi_rows=1024)
FULL = dict(n_train=None, n_test=None, scaling_rows=(10000, 30000, 60000), thread_rows=20000,
            memory_rows=None, tracemalloc_rows=10000, gemm_steps=20, gemm_repeats=20,
            inference_repeats=3, mpi_rows=None)


# -- the machine -------------------------------------------------------------


def machine_info():
    """CPU model, core counts, OpenBLAS and torch configuration."""
    cpu_model, physical = platform.processor() or "unknown", set()
    try:
        physical_id = core_id = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    cpu_model = value
                elif key == "physical id":
                    physical_id = value
                elif key == "core id":
                    core_id = value
                    physical.add((physical_id, core_id))
    except OSError:
        pass
    info = {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": len(physical) or None,
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "blas": hvae.blas_info(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "hvae": hvae.__version__,
        "torch": None,
        "torch_blas": None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        config = torch.__config__.show()
        info["torch_blas"] = "mkl" if "BLAS_INFO=mkl" in config else config.split("BLAS_INFO=")[-1].split(",")[0]
    except ImportError:
        pass
    return info


def code_state():
    """Which hvae was measured: git commit, local changes, the extension's hash."""
    import hashlib

    import hvae._core as core

    def git(*args):
        try:
            completed = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                                       text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return completed.stdout.strip() if completed.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "csrc", "hvae", "setup.py")
    with open(core.__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_core_changes": None if changed is None else bool(changed),
            "extension": os.path.basename(core.__file__), "extension_sha256": digest}


def machine_line(info):
    cores = info["physical_cores"] or info["logical_cpus"]
    return (f"{info['cpu_model']}, {cores} cores ({info['logical_cpus']} logical); "
            f"hvae BLAS: {info['blas']}; torch {info['torch']} ({info['torch_blas']}); "
            f"Python {info['python']}, NumPy {info['numpy']}")


# -- timing helpers ----------------------------------------------------------


def _system_busy_seconds():
    """CPU seconds all processes have spent busy (from /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # guest time is already counted in user.
    busy = sum(values[:8]) - idle
    return busy / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """The share of the machine's CPU time other processes used over a phase."""

    def __init__(self):
        self.start()

    def start(self):
        self.wall = time.perf_counter()
        times = os.times()
        self.own = times.user + times.system
        self.busy = _system_busy_seconds()

    def foreign_share(self):
        wall = time.perf_counter() - self.wall
        times = os.times()
        own = times.user + times.system - self.own
        busy = _system_busy_seconds()
        if busy is None or self.busy is None or wall <= 0:
            return None
        foreign = max(0.0, (busy - self.busy) - own)
        return round(foreign / (wall * (os.cpu_count() or 1)), 4)


def wait_for_quiet(max_seconds, threshold=0.15, window=2.0):
    """Wait (at most max_seconds) until other processes use < threshold of the CPUs.

    Returns the other processes' share over the last window, or None when
    /proc/stat is unreadable or max_seconds is 0.
    """
    deadline = time.perf_counter() + max_seconds
    share = None
    while max_seconds > 0:
        meter = LoadMeter()
        time.sleep(window)
        share = meter.foreign_share()
        if share is None or share < threshold or time.perf_counter() > deadline:
            break
    return share


class NoisePolicy:
    """When to repeat a measurement that other processes disturbed.

    A measurement is clean when other processes used less than ``threshold``
    of the machine's CPU time while it ran (always, with threshold None). Up
    to ``max_extra`` extra measurements are made to collect the wanted
    number of clean ones; failing that, the least disturbed are used.
    """

    def __init__(self, threshold=None, max_extra=0, wait=0.0):
        self.threshold = threshold
        self.max_extra = max_extra
        self.wait = wait  # seconds to wait for a quiet machine before each try

    def clean(self, share):
        return self.threshold is None or share is None or share < self.threshold

    def measure(self, measure, n_wanted):
        """Call measure() until n_wanted clean calls; return (values, summary)."""
        records = []
        while True:
            if self.wait and self.threshold is not None:
                wait_for_quiet(self.wait, self.threshold, window=0.5)
            meter = LoadMeter()
            value = measure()
            records.append((value, meter.foreign_share()))
            clean = [r for r in records if self.clean(r[1])]
            if len(clean) >= n_wanted or len(records) >= n_wanted + self.max_extra:
                break
        if len(clean) < n_wanted:
            clean = sorted(records, key=lambda r: r[1] or 0.0)[:n_wanted]
        shares = [r[1] for r in clean if r[1] is not None]
        summary = {"n_measured": len(records), "n_used": len(clean),
                   "foreign_cpu_used": max(shares) if shares else None,
                   "foreign_cpu_all": [r[1] for r in records]}
        return [r[0] for r in clean], summary


ACCEPT_ALL = NoisePolicy()


def median(values):
    return float(statistics.median(values))


# -- FLOPs and the GEMM limit ------------------------------------------------


def dense_layers(model):
    """hvae's dense layers as dicts, with the order of its training step.

    Returns
    -------
    forward, backward : list of dict
        Each with ``name``, ``n_in``, ``n_out`` and ``reads_x`` (the layer
        whose input is the data, for which hvae computes no dX). ``forward``
        is hvae's forward order (the buffer order: enc1..encT, dec1..decT,
        hidden layers then heads); ``backward`` its backward order (decoders
        1..T, then encoders T..1, each block's heads first and its hidden
        layers last to first).
    """
    blocks = {}
    for name, value in model.named_parameters():
        if not name.endswith(".W"):
            continue
        block, layer, _ = name.split(".")
        blocks.setdefault(block, []).append(
            {"name": f"{block}.{layer}", "n_in": int(value.shape[0]),
             "n_out": int(value.shape[1]), "hidden": layer.startswith("hidden")})
    for layers in blocks.values():
        has_hidden = any(layer["hidden"] for layer in layers)
        for layer in layers:
            reads_block_input = layer["name"].endswith(".hidden1") or not has_hidden
            layer["reads_x"] = layer["name"].startswith("enc1.") and reads_block_input
    T = model.n_layers
    forward = [layer for i in range(1, T + 1) for layer in blocks[f"enc{i}"]]
    forward += [layer for i in range(1, T + 1) for layer in blocks[f"dec{i}"]]

    def block_backward(layers):
        heads = [layer for layer in layers if not layer["hidden"]]
        hidden = [layer for layer in layers if layer["hidden"]]
        return heads + hidden[::-1]

    backward = [layer for i in range(1, T + 1) for layer in block_backward(blocks[f"dec{i}"])]
    backward += [layer for i in range(T, 0, -1) for layer in block_backward(blocks[f"enc{i}"])]
    return forward, backward


def step_flops(model, batch_size):
    """Matrix-product FLOPs of one training step on batch_size rows."""
    forward, _ = dense_layers(model)
    total = 0
    for layer in forward:
        product = 2 * batch_size * layer["n_in"] * layer["n_out"]
        total += product * (2 if layer["reads_x"] else 3)  # forward, dW, (dX)
    return total


def openblas_library():
    """hvae's OpenBLAS (scipy-openblas32), opened with ctypes."""
    import scipy_openblas32

    path = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(True))
    lib = ctypes.CDLL(path)
    lib.scipy_cblas_sgemm.restype = None
    lib.scipy_cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
    lib.scipy_openblas_set_num_threads.restype = None
    lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
    return lib, path


def mapped_libraries(fragment):
    """Paths of the mapped files whose name contains fragment."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if fragment in line.split()[-1]})
    except OSError:
        return []


def gemm_limit(model, batch_size, n_threads, n_steps=20, repeats=20):
    """Time the sgemm calls of one hvae training step, run back to back.

    Two thread policies are timed: every call on ``n_threads`` threads, and
    each call on whichever of 1 or ``n_threads`` threads ran it faster when
    timed alone (hvae itself runs small products on one thread; this does
    not depend on its cut-off). The limit is the faster policy. Each
    policy's time is the best of ``repeats`` blocks of ``n_steps`` steps:
    the limit is what the calls cost undisturbed, and with two OpenBLAS
    threads on two cores a single other runnable process can stall a block
    many times over.

    Returns
    -------
    result : dict
        ``step_flops``, ``gemm_step_seconds`` (of the faster policy),
        ``gemm_gflops``, ``n_calls`` per step and per-policy details.
    """
    ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
    lib, path = openblas_library()
    rng = np.random.default_rng(0)
    B = batch_size
    buffers = []  # keep every array alive while its pointer is in use

    def array(*shape):
        a = rng.standard_normal(shape).astype(np.float32) * 0.1
        buffers.append(a)
        return a.ctypes.data

    forward, backward = dense_layers(model)
    per_layer = {}
    for layer in forward:
        n_in, n_out = layer["n_in"], layer["n_out"]
        per_layer[layer["name"]] = dict(inp=array(B, n_in), W=array(n_in, n_out),
                                        out=array(B, n_out), dout=array(B, n_out),
                                        dW=array(n_in, n_out), dinp=array(B, n_in))
    calls = []  # cblas_sgemm arguments, in hvae's order
    for layer in forward:
        n_in, n_out, p = layer["n_in"], layer["n_out"], per_layer[layer["name"]]
        calls.append((ROW_MAJOR, NO_TRANS, NO_TRANS, B, n_out, n_in, 1.0, p["inp"], n_in,
                      p["W"], n_out, 0.0, p["out"], n_out))
    for layer in backward:
        n_in, n_out, p = layer["n_in"], layer["n_out"], per_layer[layer["name"]]
        calls.append((ROW_MAJOR, TRANS, NO_TRANS, n_in, n_out, B, 1.0, p["inp"], n_in,
                      p["dout"], n_out, 1.0, p["dW"], n_out))
        if not layer["reads_x"]:
            calls.append((ROW_MAJOR, NO_TRANS, TRANS, B, n_in, n_out, 1.0, p["dout"], n_out,
                          p["W"], n_out, 1.0, p["dinp"], n_in))
    sgemm = lib.scipy_cblas_sgemm
    set_threads = lib.scipy_openblas_set_num_threads

    def fastest_threads(args):
        best = {}
        for k in sorted({1, n_threads}):
            set_threads(k)
            for _ in range(3):
                sgemm(*args)
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(5):
                    sgemm(*args)
                runs.append(time.perf_counter() - start)
            best[k] = min(runs)
        return min(best, key=best.get)

    # hvae caches the count it last gave OpenBLAS: put the same count back.
    previous = lib.scipy_openblas_get_num_threads()
    meter = LoadMeter()
    timings = {}
    try:
        policies = {
            "all_calls": [(n_threads, args) for args in calls],
            "per_call_best": [(fastest_threads(args), args) for args in calls],
        }
        for name, sequence in policies.items():
            # Set the count only where it changes from the previous call (the
            # step repeats, so the first call follows the last), as hvae does.
            steps = [(k if k != sequence[i - 1][0] else None, args)
                     for i, (k, args) in enumerate(sequence)]

            def run_step():
                for k, args in steps:
                    if k is not None:
                        set_threads(k)
                    sgemm(*args)

            set_threads(sequence[-1][0])
            for _ in range(3):  # warm the caches and OpenBLAS's threads
                run_step()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(n_steps):
                    run_step()
                times.append((time.perf_counter() - start) / n_steps)
            timings[name] = {"best_step_seconds": min(times),
                             "median_step_seconds": median(times),
                             "n_single_thread_calls": sum(1 for k, _ in sequence if k == 1)}
    finally:
        set_threads(previous)
    flops = step_flops(model, B)
    best = min(timings, key=lambda name: timings[name]["best_step_seconds"])
    seconds = timings[best]["best_step_seconds"]
    return {
        "library": path,
        # True when the library opened here is the one mapped for hvae (numpy
        # and scipy map their own, differently named, OpenBLAS copies).
        "library_is_mapped": os.path.realpath(path) in {
            os.path.realpath(p) for p in mapped_libraries("libscipy_openblas")},
        "batch_size": B,
        "n_threads": n_threads,
        "n_calls": len(calls),
        "step_flops": flops,
        "policies": timings,
        "faster_policy": best,
        "gemm_step_seconds": seconds,
        "gemm_gflops": flops / seconds / 1e9,
        "blocks": f"best of {repeats} blocks of {n_steps} steps",
        "foreign_cpu": meter.foreign_share(),
    }


def machine_peak(n_threads, n=4096, repeats=5):
    """Single-precision GEMM GFLOP/s of a large square product, 1 and n_threads threads.

    Returns
    -------
    result : dict
        ``n``, ``gflops`` {threads: best GFLOP/s}, ``seconds`` {threads: best
        seconds} and the ``foreign_cpu`` share while it ran.
    """
    ROW_MAJOR, NO_TRANS = 101, 111
    lib, path = openblas_library()
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, n)).astype(np.float32)
    B = rng.standard_normal((n, n)).astype(np.float32)
    C = np.zeros((n, n), np.float32)
    previous = lib.scipy_openblas_get_num_threads()
    meter = LoadMeter()
    seconds = {}
    try:
        for k in sorted({1, n_threads}):
            lib.scipy_openblas_set_num_threads(k)
            times = []
            for _ in range(repeats + 1):  # the first one warms up
                start = time.perf_counter()
                lib.scipy_cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, n, n, n, 1.0,
                                      A.ctypes.data, n, B.ctypes.data, n, 0.0,
                                      C.ctypes.data, n)
                times.append(time.perf_counter() - start)
            seconds[k] = min(times[1:])
    finally:
        lib.scipy_openblas_set_num_threads(previous)
    flops = 2.0 * n ** 3
    result = {"n": n, "library": path, "seconds": seconds,
              "gflops": {k: flops / t / 1e9 for k, t in seconds.items()}}
    # The peer's BLAS (MKL in PyTorch's CPU wheels) may run the same product
    # faster than OpenBLAS: the machine's peak is the faster of the two.
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        A_t, B_t, C_t = torch.from_numpy(A), torch.from_numpy(B), torch.from_numpy(C)
        torch_seconds = {}
        previous = torch.get_num_threads()
        try:
            for k in sorted({1, n_threads}):
                torch.set_num_threads(k)
                times = []
                for _ in range(repeats + 1):
                    start = time.perf_counter()
                    torch.mm(A_t, B_t, out=C_t)
                    times.append(time.perf_counter() - start)
                torch_seconds[k] = min(times[1:])
        finally:
            torch.set_num_threads(previous)
        result["torch_seconds"] = torch_seconds
        result["torch_gflops"] = {k: flops / t / 1e9 for k, t in torch_seconds.items()}
    result["peak_gflops"] = {k: max(g, result.get("torch_gflops", {}).get(k, 0.0))
                             for k, g in result["gflops"].items()}
    result["foreign_cpu"] = meter.foreign_share()
    return result


def inference_flops(model):
    """Matrix-product FLOPs per row of transform (encoders) and score (all layers)."""
    forward, _ = dense_layers(model)
    per_layer = [(layer["name"], 2 * layer["n_in"] * layer["n_out"]) for layer in forward]
    return {"transform": sum(f for name, f in per_layer if name.startswith("enc")),
            "score": sum(f for _, f in per_layer)}


# -- training comparison -----------------------------------------------------


def _subset(X, n):
    return X if n is None or n >= X.shape[0] else X[:n]


def make_pair(workload, n_features, seed=SEED, latent_dims=None):
    """An hvae.Model and a float32 peer starting from the same parameters."""
    import peer_torch as peer

    latent_dims = workload["latent_dims"] if latent_dims is None else latent_dims
    model = hvae.Model(n_features, latent_dims, workload["hidden_dims"],
                       likelihood=workload["likelihood"], activation="relu", seed=seed)
    twin = peer.TorchHVAE(n_features, latent_dims, workload["hidden_dims"],
                          likelihood=workload["likelihood"], activation="relu")
    twin.load_named_parameters(model.named_parameters())
    return model, twin


def hvae_epoch(model, X, batch_size):
    start = time.perf_counter()
    records = model.fit(X, n_epochs=1, batch_size=batch_size, learning_rate=LEARNING_RATE)
    return time.perf_counter() - start, float(records[-1]["elbo"])


def make_peer_trainer(twin, batch_size, compiled=False, seed=SEED):
    """The peer's fastest training setup: fused Adam, buffers allocated once,
    the loss torch.compile'd when ``compiled`` (see peer_torch.Trainer)."""
    import torch

    import peer_torch as peer

    return peer.Trainer(twin, peer.make_optimizer(twin, LEARNING_RATE), batch_size,
                        torch.Generator().manual_seed(seed), compile=compiled,
                        compile_mode=PEER_COMPILE_MODE)


def peer_epoch(trainer, X_tensor):
    start = time.perf_counter()
    elbo = trainer.epoch(X_tensor)
    return time.perf_counter() - start, float(elbo)


def compare_training(workload, n_epochs, n_warmup, n_threads, n_train=None, n_test=None,
                     noise=ACCEPT_ALL, peer_variants=PEER_VARIANTS):
    """Interleaved hvae and peer epochs on one workload; see the module docs.

    Each peer variant (eager, compiled) trains its own copy of the same
    initial parameters with its own generator seeded alike, so all of them
    see the same row orders and noise draws. A round of epochs (hvae, then
    each variant) that other processes disturbed is repeated as ``noise``
    says; every learner always trains for the same number of epochs, so
    their test ELBOs stay comparable. "The peer" is the faster variant (by
    median epoch time); its figures fill the ``peer_*`` fields.
    """
    import torch

    import peer_torch as peer

    X = np.ascontiguousarray(_subset(workload["X_train"], n_train), dtype=np.float32)
    X_test = np.ascontiguousarray(_subset(workload["X_test"], n_test), dtype=np.float32)
    B = workload["batch_size"]
    model, twin = make_pair(workload, X.shape[1])
    model.n_threads = n_threads
    X_tensor = torch.from_numpy(X)
    twins = {}
    for variant in peer_variants:
        if twins:  # a further copy of the same initial parameters
            twin = peer.TorchHVAE(X.shape[1], workload["latent_dims"], workload["hidden_dims"],
                                  likelihood=workload["likelihood"], activation="relu")
            twin.load_named_parameters(model.named_parameters())
        twins[variant] = twin
    with peer.torch_threads(n_threads):
        trainers = {variant: make_peer_trainer(twin, B, compiled=(variant == "compiled"))
                    for variant, twin in twins.items()}
        compile_meter = LoadMeter()
        compile_seconds = {variant: trainer.warm_up(X_tensor)
                           for variant, trainer in trainers.items() if trainer.compiled}
        compile_foreign = compile_meter.foreign_share()
        for _ in range(n_warmup):
            hvae_epoch(model, X, B)
            for trainer in trainers.values():
                peer_epoch(trainer, X_tensor)

        def epoch_round():
            return (hvae_epoch(model, X, B),
                    {variant: peer_epoch(trainer, X_tensor)
                     for variant, trainer in trainers.items()})

        rounds, summary = noise.measure(epoch_round, n_epochs)
        hvae_seconds = [h[0] for h, _ in rounds]
        hvae_train = [h[1] for h, _ in rounds]
        hvae_scores = model.elbo(X_test)
        variants = {}
        for variant, twin in twins.items():
            seconds = [p[variant][0] for _, p in rounds]
            scores = peer.score_samples(twin, X_test)
            variants[variant] = {
                "epoch_seconds": seconds,
                "samples_per_s": X.shape[0] / median(seconds),
                "train_elbo": [p[variant][1] for _, p in rounds],
                "test_elbo": float(scores.mean()),
                "test_elbo_sem": float(scores.std() / math.sqrt(len(scores))),
                "compile_seconds": compile_seconds.get(variant),
            }
    best = max(variants, key=lambda v: variants[v]["samples_per_s"])
    n = X.shape[0]
    hvae_rate = n / median(hvae_seconds)
    peer_rate = variants[best]["samples_per_s"]
    flops_per_row = step_flops(model, 1)
    for v in variants.values():
        v["gflops"] = flops_per_row * v["samples_per_s"] / 1e9
        v["hvae_ratio"] = hvae_rate / v["samples_per_s"]
    return {
        "name": workload["name"],
        "n_train": n,
        "n_test": X_test.shape[0],
        "test_is_train": workload["name"] == "W1",
        "n_features": X.shape[1],
        "latent_dims": list(workload["latent_dims"]),
        "hidden_dims": list(workload["hidden_dims"]),
        "batch_size": B,
        "n_threads": n_threads,
        "n_params": int(model.n_params),
        "n_warmup_epochs": n_warmup,
        "n_timed_epochs": n_epochs,
        "n_epochs_trained": n_warmup + summary["n_measured"],
        "hvae_epoch_seconds": hvae_seconds,
        "hvae_samples_per_s": hvae_rate,
        "hvae_train_elbo": hvae_train,
        "hvae_test_elbo": float(hvae_scores.mean()),
        "hvae_test_elbo_sem": float(hvae_scores.std() / math.sqrt(len(hvae_scores))),
        # "The peer": the faster of the variants.
        "peer_variant": best,
        "peer_epoch_seconds": variants[best]["epoch_seconds"],
        "peer_samples_per_s": peer_rate,
        "ratio": hvae_rate / peer_rate,
        "peer_train_elbo": variants[best]["train_elbo"],
        "peer_test_elbo": variants[best]["test_elbo"],
        "peer_test_elbo_sem": variants[best]["test_elbo_sem"],
        "peer_variants": variants,
        "peer_compile_mode": PEER_COMPILE_MODE,
        "peer_compile_foreign_cpu": compile_foreign,
        "flops_per_row": flops_per_row,
        "hvae_gflops": flops_per_row * hvae_rate / 1e9,
        "peer_gflops": flops_per_row * peer_rate / 1e9,
        "foreign_cpu": summary["foreign_cpu_used"],
        "noise": summary,
        "models": (model, twins[best]),  # dropped before writing JSON
    }


# -- inference throughput ----------------------------------------------------


def compare_inference(model, twin, X_test, n_threads, repeats, noise=ACCEPT_ALL,
                      peer_variants=PEER_VARIANTS):
    """Rows/s of encode/transform and elbo/score_samples, interleaved.

    The peer runs eager and, with "compiled" among ``peer_variants``, through
    ``peer_torch.compile_inference`` (compiled for both chunk shapes before
    any timing; the seconds are recorded); the faster variant per task is
    the peer.
    """
    import peer_torch as peer

    X_test = np.ascontiguousarray(X_test, dtype=np.float32)
    model.n_threads = n_threads
    result = {"n_rows": X_test.shape[0], "n_threads": n_threads, "repeats": repeats}
    with peer.torch_threads(n_threads):
        functions = {"eager": {"encode": None, "elbo": None}}
        if "compiled" in peer_variants:
            start = time.perf_counter()
            functions["compiled"] = peer.compile_inference(twin, PEER_COMPILE_MODE)
            peer.transform(twin, X_test, encode=functions["compiled"]["encode"])
            peer.score_samples(twin, X_test, elbo=functions["compiled"]["elbo"])
            result["peer_compile_seconds"] = time.perf_counter() - start
        tasks = {
            "transform": (lambda: model.encode(X_test), {
                v: (lambda f=f: peer.transform(twin, X_test, encode=f["encode"]))
                for v, f in functions.items()}),
            "score": (lambda: model.elbo(X_test), {
                v: (lambda f=f: peer.score_samples(twin, X_test, elbo=f["elbo"]))
                for v, f in functions.items()}),
        }
        warm_up = X_test[:1000]
        model.encode(warm_up), model.elbo(warm_up)
        peer.transform(twin, warm_up), peer.score_samples(twin, warm_up)
        for name, (hvae_call, peer_calls) in tasks.items():

            def timed_round():
                start = time.perf_counter()
                hvae_call()
                times = {"hvae": time.perf_counter() - start}
                for variant, call in peer_calls.items():
                    start = time.perf_counter()
                    call()
                    times[variant] = time.perf_counter() - start
                return times

            rounds, summary = noise.measure(timed_round, repeats)
            flops = inference_flops(model)[name]
            rates = {key: X_test.shape[0] / median([r[key] for r in rounds])
                     for key in rounds[0]}
            best = max(peer_calls, key=lambda v: rates[v])
            result[name] = {"hvae_rows_per_s": rates["hvae"], "peer_rows_per_s": rates[best],
                            "peer_variant": best,
                            "peer_variants": {v: {"rows_per_s": rates[v],
                                                  "gflops": rates[v] * flops / 1e9}
                                              for v in peer_calls},
                            "ratio": rates["hvae"] / rates[best], "noise": summary,
                            "flops_per_row": flops,
                            "hvae_gflops": rates["hvae"] * flops / 1e9,
                            "peer_gflops": rates[best] * flops / 1e9}
    result["foreign_cpu"] = max((result[name]["noise"]["foreign_cpu_used"] or 0.0)
                                for name in tasks)
    return result


# -- memory ------------------------------------------------------------------


def _status_bytes(key):
    """A size from /proc/self/status (VmRSS, VmHWM: the peak RSS), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _rss_bytes():
    return _status_bytes("VmRSS")


def _hwm_bytes():
    return _status_bytes("VmHWM")


def _maxrss_bytes():
    # Linux reports ru_maxrss in kilobytes. It also counts the address space
    # this process had before exec: a child spawned by a big parent starts
    # with the parent's RSS as its ru_maxrss (see memory_child).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(config):
    """Run in a fresh interpreter: peak RSS of one epoch of fitting.

    ``config`` holds library ("hvae" or "peer"), path (a .npy of X),
    latent_dims, hidden_dims, batch_size, n_threads, tracemalloc_rows.
    """
    library = config["library"]
    if library == "peer":
        import torch

        import peer_torch as peer
    rss_after_imports = _rss_bytes()
    X = np.load(config["path"])
    assert X.dtype == np.float32 and X.flags.c_contiguous
    rss_after_data = _rss_bytes()
    maxrss_before_fit = _maxrss_bytes()
    hwm_before_fit = _hwm_bytes()
    B, k = config["batch_size"], config["n_threads"]
    result = {"library": library, "x_bytes": int(X.nbytes), "n_rows": int(X.shape[0]),
              "rss_after_imports": rss_after_imports, "rss_after_data": rss_after_data,
              "maxrss_before_fit": maxrss_before_fit, "hwm_before_fit": hwm_before_fit}
    start = time.perf_counter()
    if library == "hvae":
        model = hvae.Model(X.shape[1], config["latent_dims"], config["hidden_dims"],
                           likelihood="bernoulli", seed=SEED)
        model.n_threads = k
        model.fit(X, n_epochs=1, batch_size=B, learning_rate=LEARNING_RATE)
    else:
        torch.set_num_threads(k)
        torch.manual_seed(SEED)
        twin = peer.TorchHVAE(X.shape[1], config["latent_dims"], config["hidden_dims"])
        peer.train_epoch(twin, peer.make_optimizer(twin, LEARNING_RATE), torch.from_numpy(X), B,
                         torch.Generator().manual_seed(SEED))
    result["fit_seconds"] = time.perf_counter() - start
    # The peak is VmHWM, the high-water mark of this interpreter's own address
    # space. ru_maxrss is kept for reference only: at exec the kernel folds
    # the old address space's high-water mark into it, so a child spawned by
    # this suite (torch and the data loaded) reports at least the suite's RSS.
    result["peak_rss"] = _hwm_bytes()
    result["ru_maxrss"] = _maxrss_bytes()
    result["rss_after_fit"] = _rss_bytes()
    result["overhead_beyond_x"] = result["peak_rss"] - rss_after_imports - X.nbytes
    result["peak_minus_rss_after_data"] = result["peak_rss"] - rss_after_data
    if library == "hvae":
        import tracemalloc

        # Fits on C-contiguous views (no copy) of n/2 and n rows: a copy of X
        # would grow the traced peak by the extra rows' bytes; what fitting
        # allocates through Python's allocators regardless of n does not.
        n = config["tracemalloc_rows"]
        peaks = []
        for view in (X[: n // 2], X[:n]):
            tracemalloc.start()
            model.fit(view, n_epochs=1, batch_size=B, learning_rate=LEARNING_RATE)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        extra_bytes = X[:n].nbytes - X[: n // 2].nbytes
        result["tracemalloc_rows"] = n
        result["tracemalloc_x_bytes"] = int(X[:n].nbytes)
        result["tracemalloc_peak"] = int(peaks[1])
        result["tracemalloc_peak_half_rows"] = int(peaks[0])
        result["no_copy_of_x"] = bool(peaks[1] - peaks[0] < extra_bytes / 10)
        # What hvae allocates in C: parameters, gradients and two Adam moments.
        result["params_grads_moments_bytes"] = int(model.n_params) * 4 * 4
        result["params_bytes"] = int(model.n_params) * 4
    return result


def measure_memory(workload, n_threads, n_rows=None, tracemalloc_rows=10000,
                   libraries=("hvae", "peer")):
    """Run `memory_child` for each library in a fresh subprocess."""
    X = np.ascontiguousarray(_subset(workload["X_train"], n_rows), dtype=np.float32)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "X.npy")
        np.save(path, X)
        for library in libraries:
            config = dict(library=library, path=path, latent_dims=list(workload["latent_dims"]),
                          hidden_dims=list(workload["hidden_dims"]),
                          batch_size=workload["batch_size"], n_threads=n_threads,
                          tracemalloc_rows=min(tracemalloc_rows, X.shape[0]))
            completed = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--memory-child",
                 json.dumps(config)],
                check=True, capture_output=True, text=True)
            results[library] = json.loads(completed.stdout.strip().splitlines()[-1])
    results["workload"] = workload["name"]
    return results


# -- scaling -----------------------------------------------------------------


def scaling_rows_and_layers(workload, row_counts, n_epochs, n_warmup, n_threads,
                            noise=ACCEPT_ALL):
    """hvae epoch seconds on the first n rows of W2's data, for T = 1..4."""
    cells = []
    for latent_dims in SCALING_LATENT_DIMS:
        model = hvae.Model(workload["X_train"].shape[1], latent_dims, workload["hidden_dims"],
                           likelihood="bernoulli", seed=SEED)
        model.n_threads = n_threads
        B = workload["batch_size"]
        for _ in range(n_warmup):
            hvae_epoch(model, _subset(workload["X_train"], row_counts[0]), B)
        for n in row_counts:
            X = _subset(workload["X_train"], n)
            seconds, summary = noise.measure(lambda: hvae_epoch(model, X, B)[0], n_epochs)
            cells.append({"n_layers": len(latent_dims), "latent_dims": list(latent_dims),
                          "n_rows": int(X.shape[0]), "epoch_seconds": median(seconds),
                          "foreign_cpu": summary["foreign_cpu_used"],
                          "n_measured": summary["n_measured"],
                          "samples_per_s": X.shape[0] / median(seconds),
                          "gflops": step_flops(model, 1) * X.shape[0] / median(seconds) / 1e9})
    # Linearity in n: epoch seconds per row relative to the smallest n.
    for cell in cells:
        base = next(c for c in cells if c["n_layers"] == cell["n_layers"])
        cell["seconds_per_row_vs_smallest"] = (
            cell["epoch_seconds"] / cell["n_rows"]) / (base["epoch_seconds"] / base["n_rows"])
    return {"workload": workload["name"], "hidden_dims": list(workload["hidden_dims"]),
            "n_threads": n_threads, "n_timed_epochs": n_epochs, "cells": cells,
            "foreign_cpu": max((c["foreign_cpu"] or 0.0) for c in cells)}


def thread_speedup(workload, n_rows, n_epochs, n_warmup, thread_counts=(1, 2),
                   noise=ACCEPT_ALL):
    """Epoch seconds of hvae and the peer at 1 and 2 threads, interleaved."""
    import torch

    import peer_torch as peer

    X = np.ascontiguousarray(_subset(workload["X_train"], n_rows), dtype=np.float32)
    B = workload["batch_size"]
    model, twin = make_pair(workload, X.shape[1])
    X_tensor = torch.from_numpy(X)
    trainer = make_peer_trainer(twin, B)  # eager: its speedup with threads

    def one_round():
        times = {}
        for k in thread_counts:
            model.n_threads = k
            times[("hvae", k)] = hvae_epoch(model, X, B)[0]
            with peer.torch_threads(k):
                times[("peer", k)] = peer_epoch(trainer, X_tensor)[0]
        return times

    for _ in range(n_warmup):
        one_round()
    rounds, summary = noise.measure(one_round, n_epochs)
    seconds = {key: [r[key] for r in rounds] for key in rounds[0]}
    result = {"workload": workload["name"], "n_rows": int(X.shape[0]),
              "n_timed_epochs": n_epochs, "foreign_cpu": summary["foreign_cpu_used"],
              "n_measured": summary["n_measured"]}
    low, high = thread_counts[0], thread_counts[-1]
    for lib in ("hvae", "peer"):
        per_k = {str(k): median(seconds[(lib, k)]) for k in thread_counts}
        result[lib] = {"epoch_seconds": per_k,
                       "speedup": per_k[str(low)] / per_k[str(high)]}
    return result


def mpi_scaling(n_rows, n_epochs, n_warmup, process_counts=(1, 2), timeout=1800):
    """W2 data-parallel over MPI (bench/mpi.py under mpirun), one thread per
    process: samples/s, the reductions' share of an epoch and one Allreduce
    of the gradient alone. None with the reason when mpirun or mpi4py is
    missing."""
    import shutil

    if shutil.which("mpirun") is None:
        return {"skipped": "mpirun not found (Debian: apt-get install openmpi-bin)"}
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return {"skipped": "mpi4py not installed (pip install 'hvae[mpi]')"}
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    result = {"workload": "W2", "threads_per_process": 1, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for P in process_counts:
            out = Path(tmp) / f"mpi{P}.json"
            command = ["mpirun", "-n", str(P), sys.executable, str(BENCH_DIR / "mpi.py"),
                       "--epochs", str(n_epochs), "--warmup", str(n_warmup), "--threads", "1",
                       "--json", str(out)]
            if n_rows is not None:
                command += ["--rows", str(n_rows)]
            meter = LoadMeter()
            run = subprocess.run(command, env=env, capture_output=True, text=True,
                                 timeout=timeout)
            if run.returncode != 0:
                result["runs"][str(P)] = {"failed": run.stderr[-2000:]}
                continue
            cell = json.loads(out.read_text())
            # This process is idle meanwhile: all CPU time not mpirun's
            # children is foreign, but the meter cannot tell them apart.
            cell["machine_cpu"] = meter.foreign_share()
            result["runs"][str(P)] = cell
    runs = result["runs"]
    if all("samples_per_s" in runs.get(str(P), {}) for P in process_counts):
        base = runs[str(process_counts[0])]["samples_per_s"]
        result["speedup"] = {str(P): runs[str(P)]["samples_per_s"] / base
                             for P in process_counts}
    return result


# -- the report --------------------------------------------------------------


def _fmt_rate(value):
    return f"{value:,.0f}"


def format_report(results):
    lines = []
    lines.append("machine: " + machine_line(results["machine"]))
    code = results["code"]
    lines.append(f"hvae: commit {code['commit']}"
                 f"{' + uncommitted C/Python changes' if code['uncommitted_core_changes'] else ''}, "
                 f"{code['extension']} sha256 {code['extension_sha256']}"
                 f"{' (REBUILT DURING THE RUN)' if code.get('extension_changed_during_run') else ''}")
    settings = results["settings"]
    lines.append(f"settings: {settings['n_threads']} threads, Adam lr {LEARNING_RATE}, float32, "
                 f"{settings['n_warmup']} warm-up + {settings['n_epochs']} timed epochs "
                 f"(medians){', QUICK' if settings['quick'] else ''}")
    lines.append("")
    header = (f"{'workload':<9}{'hvae samples/s':>16}{'peer eager':>12}{'peer compiled':>15}"
              f"{'ratio':>8}{' vs':<10}{'% GEMM limit':>14}{'hvae test ELBO':>16}"
              f"{'peer test ELBO':>16}{'other CPU':>11}")
    lines.append(header)
    lines.append("-" * len(header))
    for w in results["workloads"]:
        gemm = w["gemm_limit"]
        note = " (train)" if w["test_is_train"] else ""
        foreign = "" if w["foreign_cpu"] is None else f"{100 * w['foreign_cpu']:.0f}%"
        rates = {v: _fmt_rate(r["samples_per_s"]) for v, r in w["peer_variants"].items()}
        lines.append(f"{w['name'] + note:<9}{_fmt_rate(w['hvae_samples_per_s']):>16}"
                     f"{rates.get('eager', '-'):>12}{rates.get('compiled', '-'):>15}"
                     f"{w['ratio']:>8.2f}{' ' + w['peer_variant']:<10}"
                     f"{gemm['hvae_percent_of_limit']:>13.0f}%{w['hvae_test_elbo']:>16.2f}"
                     f"{w['peer_test_elbo']:>16.2f}{foreign:>11}")
    compiled = [w for w in results["workloads"] if "compiled" in w["peer_variants"]]
    if compiled:
        lines.append("peer compile seconds (torch.compile mode "
                     f"{compiled[0]['peer_compile_mode'] or 'default'}, excluded from "
                     "samples/s): " + ", ".join(
                         f"{w['name']} {w['peer_variants']['compiled']['compile_seconds']:.1f}"
                         for w in compiled))
    if any(w["test_is_train"] for w in results["workloads"]):
        lines.append("(train): W1 has no test split; its ELBO is on the training data.")
    lines.append("")
    lines.append("GEMM limit (matrix-product FLOPs of a step / time of the same sgemm calls "
                 "back to back):")
    for w in results["workloads"]:
        gemm = w["gemm_limit"]
        lines.append(f"  {w['name']}: {gemm['step_flops'] / 1e6:.1f} MFLOP/step "
                     f"({gemm['n_calls']} sgemm calls, {gemm['faster_policy']}); GEMM-only "
                     f"{gemm['gemm_gflops']:.1f} GFLOP/s "
                     f"({1e3 * gemm['gemm_step_seconds']:.2f} ms/step); "
                     f"hvae {w['hvae_gflops']:.1f} GFLOP/s "
                     f"({1e3 * gemm['hvae_step_seconds']:.2f} ms/step, "
                     f"{gemm['hvae_percent_of_limit']:.0f}%); peer "
                     + ", ".join(f"{v} {r['gflops']:.1f} GFLOP/s ({r['percent_of_limit']:.0f}%)"
                                 for v, r in w["peer_variants"].items()))
    inference = results.get("inference")
    if inference:
        lines.append("")
        lines.append(f"inference on {inference['workload']} test ({inference['n_rows']} rows), "
                     "rows/s:")
        for name, label in (("transform", "transform (encode)"), ("score", "score (elbo)")):
            r = inference[name]
            line = (f"  {label:<20} hvae {_fmt_rate(r['hvae_rows_per_s']):>10}   "
                    f"peer {_fmt_rate(r['peer_rows_per_s']):>10} ({r['peer_variant']}; "
                    + ", ".join(f"{v} {_fmt_rate(x['rows_per_s'])}"
                                for v, x in r["peer_variants"].items())
                    + f")   ratio {r['ratio']:.2f}")
            if "hvae_percent_of_peak" in r:
                line += (f"   ({r['flops_per_row'] / 1e6:.2f} MFLOP/row: hvae "
                         f"{r['hvae_gflops']:.0f} GFLOP/s = {r['hvae_percent_of_peak']:.0f}%, "
                         f"peer {r['peer_gflops']:.0f} GFLOP/s = "
                         f"{r['peer_percent_of_peak']:.0f}% of peak; 3x the peer would need "
                         f"{r['three_times_peer_percent_of_peak']:.0f}%)")
            lines.append(line)
    if inference and inference.get("peer_compile_seconds") is not None:
        lines.append(f"  peer torch.compile of encode and elbo (both chunk shapes): "
                     f"{inference['peer_compile_seconds']:.1f} s, excluded")
    peak = results.get("machine_peak")
    if peak:
        lines.append("  machine peak (square sgemm n = {}, the faster of OpenBLAS and torch.mm): "
                     .format(peak["n"])
                     + ", ".join(f"{k} thread{'s' if int(k) > 1 else ''} "
                                 f"{g:.0f} GFLOP/s" for k, g in peak["peak_gflops"].items())
                     + " (OpenBLAS " + ", ".join(f"{g:.0f}" for g in peak["gflops"].values())
                     + "; torch.mm " + ", ".join(f"{g:.0f}" for g in
                                                 peak.get("torch_gflops", {}).values()) + ")")
    memory = results.get("memory")
    if memory:
        lines.append("")
        lines.append(f"memory, one epoch of {memory['workload']} in a fresh process (MB):")
        for lib in ("hvae", "peer"):
            m = memory.get(lib)
            if not m:
                continue
            mb = lambda v: v / 2**20  # noqa: E731
            line = (f"  {lib}: X {mb(m['x_bytes']):.1f}; RSS after imports "
                    f"{mb(m['rss_after_imports']):.1f}, after loading X "
                    f"{mb(m['rss_after_data']):.1f}; peak {mb(m['peak_rss']):.1f}; "
                    f"peak - imports - X = {mb(m['overhead_beyond_x']):.1f}")
            lines.append(line)
        m = memory.get("hvae")
        if m:
            lines.append(f"  hvae tracemalloc peak during a fit on a {m['tracemalloc_rows']}-row "
                         f"view ({m['tracemalloc_x_bytes'] / 2**20:.1f} MB): "
                         f"{m['tracemalloc_peak'] / 2**20:.2f} MB, on half of it "
                         f"{m['tracemalloc_peak_half_rows'] / 2**20:.2f} MB -> "
                         f"{'no copy of X' if m['no_copy_of_x'] else 'X IS COPIED'} "
                         f"(parameters: {m['params_bytes'] / 2**20:.2f} MB)")
    scaling = results.get("scaling")
    if scaling:
        rows = scaling["rows_and_layers"]
        lines.append("")
        lines.append(f"hvae epoch seconds on {rows['workload']} data ({rows['n_threads']} threads; "
                     "per-row time vs the smallest n in brackets):")
        counts = sorted({c["n_rows"] for c in rows["cells"]})
        lines.append("  " + f"{'T':<4}{'latent dims':<18}" + "".join(f"{n:>18,}" for n in counts))
        for latent_dims in SCALING_LATENT_DIMS:
            cells = [c for c in rows["cells"] if tuple(c["latent_dims"]) == latent_dims]
            if not cells:
                continue
            lines.append("  " + f"{len(latent_dims):<4}{str(latent_dims):<18}" + "".join(
                f"{c['epoch_seconds']:>10.2f} ({c['seconds_per_row_vs_smallest']:.2f})"
                for c in cells))
        threads = scaling["threads"]
        lines.append(f"  threads ({threads['workload']}, {threads['n_rows']} rows): "
                     + "; ".join(
                         f"{lib} " + ", ".join(f"{k} thr {s:.2f}s"
                                               for k, s in threads[lib]["epoch_seconds"].items())
                         + f" (speedup {threads[lib]['speedup']:.2f}x)"
                         for lib in ("hvae", "peer")))
    mpi = results.get("mpi")
    if mpi:
        lines.append("")
        if "skipped" in mpi:
            lines.append(f"MPI: skipped ({mpi['skipped']})")
        else:
            lines.append(f"MPI data-parallel {mpi['workload']} (global batch 128, 1 thread per "
                         "process):")
            for P, cell in mpi["runs"].items():
                if "failed" in cell:
                    lines.append(f"  {P} process(es): FAILED")
                    continue
                share = max(cell["reduce_share"])
                lines.append(
                    f"  {P} process(es): {_fmt_rate(cell['samples_per_s'])} samples/s "
                    f"(speedup {mpi.get('speedup', {}).get(P, float('nan')):.2f}x); "
                    f"{1e3 * cell['step_seconds']:.2f} ms/step; one Allreduce of "
                    f"{cell['allreduce_bytes'] / 2**20:.1f} MB {1e3 * cell['allreduce_seconds']:.2f}"
                    f" ms = {100 * cell['communication_share']:.1f}% of a step; time in the "
                    f"reductions (waiting included) up to {100 * share:.0f}%")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------


def run(quick=False, workload_names=None, n_epochs=None, n_warmup=None, n_threads=2,
        json_path=DEFAULT_JSON, verbose=True, wait_quiet=0, retry_noisy=0,
        noise_threshold=0.15, peer_variants=PEER_VARIANTS):
    """Run the suite; return the results dict (also written to json_path)."""
    # Compile times as a user's first run sees them: an empty on-disk cache
    # for torch.compile (unless the caller chose a cache directory).
    compile_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if compile_cache is None and "compiled" in peer_variants:
        compile_cache = tempfile.mkdtemp(prefix="hvae-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache
    import torch

    sizes = QUICK if quick else FULL
    n_epochs = (1 if quick else 3) if n_epochs is None else n_epochs
    n_warmup = 1 if n_warmup is None else n_warmup
    names = list(workload_names or data.WORKLOAD_NAMES)

    def say(message):
        if verbose:
            print(message, file=sys.stderr, flush=True)

    noise = NoisePolicy(noise_threshold if retry_noisy else None, retry_noisy, wait_quiet)
    started = time.perf_counter()
    results = {
        "machine": machine_info(),
        "settings": {"quick": quick, "n_threads": n_threads, "n_epochs": n_epochs,
                     "n_warmup": n_warmup, "learning_rate": LEARNING_RATE, "dtype": "float32",
                     "optimizer": "adam", "seed": SEED, "workloads": names,
                     "wait_quiet": wait_quiet, "retry_noisy": retry_noisy,
                     "noise_threshold": noise.threshold,
                     "peer_variants": list(peer_variants),
                     "peer_compile_mode": PEER_COMPILE_MODE,
                     "peer_compile_cache": compile_cache},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": code_state(),
        "loadavg_start": os.getloadavg(),
        "workloads": [],
    }
    say(machine_line(results["machine"]))
    torch_threads_before = torch.get_num_threads()
    by_name = {}
    for workload in data.workloads(names):
        if wait_quiet:
            say(f"other CPU use before {workload['name']}: {wait_for_quiet(wait_quiet)}")
        say(f"training {workload['name']} ...")
        w = compare_training(workload, n_epochs, n_warmup, n_threads,
                             n_train=sizes["n_train"], n_test=sizes["n_test"], noise=noise,
                             peer_variants=peer_variants)
        model = w["models"][0]
        gemms, gemm_noise = noise.measure(
            lambda: gemm_limit(model, w["batch_size"], n_threads, n_steps=sizes["gemm_steps"],
                               repeats=sizes["gemm_repeats"]), 1)
        gemm = gemms[0]
        gemm["noise"] = gemm_noise
        gemm["hvae_gflops"] = w["hvae_gflops"]
        gemm["peer_gflops"] = w["peer_gflops"]
        gemm["hvae_percent_of_limit"] = 100 * w["hvae_gflops"] / gemm["gemm_gflops"]
        gemm["peer_percent_of_limit"] = 100 * w["peer_gflops"] / gemm["gemm_gflops"]
        for v in w["peer_variants"].values():
            v["percent_of_limit"] = 100 * v["gflops"] / gemm["gemm_gflops"]
        gemm["hvae_step_seconds"] = gemm["step_flops"] / (w["hvae_gflops"] * 1e9)
        w["gemm_limit"] = gemm
        by_name[workload["name"]] = (workload, w)
        results["workloads"].append(w)
        say(f"  hvae {w['hvae_samples_per_s']:,.0f}/s, peer ({w['peer_variant']}) "
            f"{w['peer_samples_per_s']:,.0f}/s, "
            f"ratio {w['ratio']:.2f}, {gemm['hvae_percent_of_limit']:.0f}% of GEMM limit")

    if any(name != "W1" for name in names):
        w2 = data.workloads(["W2"])[0]
        if "W2" in by_name:
            model, twin = by_name["W2"][1]["models"]
        else:
            model, twin = make_pair(w2, w2["X_train"].shape[1])
        if wait_quiet:
            wait_for_quiet(wait_quiet)
        say("inference ...")
        results["inference"] = compare_inference(
            model, twin, _subset(w2["X_test"], sizes["n_test"]), n_threads,
            sizes["inference_repeats"], noise=noise, peer_variants=peer_variants)
        results["inference"]["workload"] = "W2"
        say("machine peak ...")
        peak = machine_peak(n_threads, n=2048 if quick else 4096)
        results["machine_peak"] = peak
        peak_gflops = peak["peak_gflops"][n_threads]
        for name in ("transform", "score"):
            r = results["inference"][name]
            r["machine_peak_gflops"] = peak_gflops
            r["hvae_percent_of_peak"] = 100 * r["hvae_gflops"] / peak_gflops
            r["peer_percent_of_peak"] = 100 * r["peer_gflops"] / peak_gflops
            for v in r["peer_variants"].values():
                v["percent_of_peak"] = 100 * v["gflops"] / peak_gflops
            # What 3x the peer's rows/s would take, at the same FLOPs per row.
            r["three_times_peer_percent_of_peak"] = 300 * r["peer_gflops"] / peak_gflops
        say("memory ...")
        results["memory"] = measure_memory(w2, n_threads, n_rows=sizes["memory_rows"],
                                           tracemalloc_rows=sizes["tracemalloc_rows"])
        if wait_quiet:
            wait_for_quiet(wait_quiet)
        say("scaling ...")
        results["scaling"] = {
            "rows_and_layers": scaling_rows_and_layers(w2, sizes["scaling_rows"], n_epochs,
                                                       n_warmup, n_threads, noise=noise),
            "threads": thread_speedup(w2, sizes["thread_rows"], n_epochs, n_warmup,
                                      thread_counts=(1, max(2, n_threads)), noise=noise),
        }
        if wait_quiet:
            wait_for_quiet(wait_quiet)
        say("MPI ...")
        results["mpi"] = mpi_scaling(sizes["mpi_rows"], n_epochs, n_warmup)
    torch.set_num_threads(torch_threads_before)
    for w in results["workloads"]:
        w.pop("models", None)
    results["loadavg_end"] = os.getloadavg()
    # The extension file may be rebuilt while the suite runs (this process
    # keeps the old mapping, or worse): say so rather than mix two builds.
    results["code"]["extension_changed_during_run"] = (
        code_state()["extension_sha256"] != results["code"]["extension_sha256"])
    if results["code"]["extension_changed_during_run"]:
        say("WARNING: hvae's extension was rebuilt during the run; re-run the suite.")
    results["total_seconds"] = time.perf_counter() - started
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny subsets and one timed epoch (a smoke test, < 20 s)")
    parser.add_argument("--workloads", nargs="+", choices=data.WORKLOAD_NAMES,
                        help="which workloads to train (default: all)")
    parser.add_argument("--epochs", type=int, help="timed epochs per library (default 3; quick 1)")
    parser.add_argument("--warmup", type=int, help="warm-up epochs per library (default 1)")
    parser.add_argument("--threads", type=int, default=2,
                        help="BLAS / torch threads for everything but the thread scaling")
    parser.add_argument("--json", help=f"where to write the results (default {DEFAULT_JSON}; "
                        f"with --quick, {QUICK_JSON})")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each phase, wait up to this long for other processes "
                             "to use < 15%% of the CPUs (default 0: don't wait)")
    parser.add_argument("--retry-noisy", type=int, default=0, metavar="N",
                        help="up to N extra measurements per cell to replace ones during "
                             "which other processes used >= 15%% of the CPUs (default 0)")
    parser.add_argument("--no-compile", action="store_true",
                        help="train only the eager peer (no torch.compile variant)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    json_path = args.json or (QUICK_JSON if args.quick else DEFAULT_JSON)
    results = run(quick=args.quick, workload_names=args.workloads, n_epochs=args.epochs,
                  n_warmup=args.warmup, n_threads=args.threads, json_path=json_path,
                  wait_quiet=args.wait_quiet, retry_noisy=args.retry_noisy,
                  peer_variants=("eager",) if args.no_compile else PEER_VARIANTS)
    print(format_report(results))
    print(f"\nwrote {json_path} ({results['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
