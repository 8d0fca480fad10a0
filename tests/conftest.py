"""Shared test settings.

Hypothesis profiles for the property-based tests (tests/test_fuzz.py):

* ``ci`` (the default): 50 examples per test, derandomized, no example
  database, so every run explores the same cases and a failure reproduces.
* ``explore``: 1000 random examples per test, for a longer local hunt:
  ``HVAE_HYPOTHESIS_PROFILE=explore pytest tests/test_fuzz.py``.

Ctrl-C: several tests send the process SIGINT and expect KeyboardInterrupt.
A shell starts a background job with SIGINT ignored, and Python then
installs no handler, so those tests would wait forever; the suite restores
Python's own handler.
"""
import os
import signal
import tempfile

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    settings = None

if settings is not None:
    # Hypothesis writes failing-example patches under its storage directory;
    # keep them out of the work tree.
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                          os.path.join(tempfile.gettempdir(), "hvae-hypothesis"))
    # No example database and no explain phase: nothing is written to .hypothesis/.
    _common = dict(deadline=None, database=None, print_blob=True,
                   phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=50, derandomize=True, **_common)
    settings.register_profile("explore", max_examples=1000, **_common)
    settings.load_profile(os.environ.get("HVAE_HYPOTHESIS_PROFILE", "ci"))
