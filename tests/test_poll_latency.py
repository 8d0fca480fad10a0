"""Ctrl-C inside one large training minibatch (a million rows times draws).

Its long row-wise passes (the workspace's first mapping, the noise, the
staging, the likelihood passes, an activation's backward) poll between
pieces of about a million values; a poll that fires anywhere in them must
leave the model as every other stop does: the minibatch cut short is not
applied. tests/test_under_attack.py times the stop.
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_anywhere_in_a_large_minibatch_applies_nothing():
    script = textwrap.dedent("""
        import os, signal, threading, time
        import numpy as np
        import hvae
        X = np.random.default_rng(0).random((256, 64), dtype=np.float32)
        for delay in (0.05, 0.3, 0.6):
            m = hvae.Model(64, latent_dims=(4,), hidden_dims=(16,), seed=0)
            before = m.parameters.copy()
            sent = []
            def interrupt():
                time.sleep(delay)
                sent.append(time.perf_counter())
                os.kill(os.getpid(), signal.SIGINT)
            timer = threading.Thread(target=interrupt)
            timer.start()
            history = []
            try:  # one minibatch of 256 * 4096 rows
                m.fit(X, batch_size=256, n_samples=2**12, history=history)
                timer.join()
                print("finished", m.optimizer_steps)
            except KeyboardInterrupt:
                latency = time.perf_counter() - sent[0]
                timer.join()
                print("stopped", m.optimizer_steps, len(history),
                      int(np.array_equal(m.parameters, before)),
                      int(np.all(np.isfinite(m.encode(X[:2])[0]))), "%.3f" % latency)
            del m
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert len(lines) == 3, result.stdout
    # 0.05 s in, the minibatch is still mapping its workspace or drawing.
    assert lines[0][0] == "stopped", result.stdout
    for line in lines:
        if line[0] == "finished":  # a fast machine: the step was applied
            assert line[1] == "1", result.stdout
            continue
        # no step, no epoch record, the parameters as they were, usable
        assert line[1:5] == ["0", "0", "1", "1"], result.stdout
        assert float(line[5]) < 2.0, result.stdout
