"""The estimator-level lock: one ``fit``, ``partial_fit``, ``save``,
pickling or ``set_params`` of an estimator at a time.

Two threads fitting one estimator would interleave their passes (a model
equal to neither fit, a history with the steps of one), and pickling during
a fit would capture a model ahead of its history. :class:`EstimatorLock`
makes them wait for each other instead. A call from inside the estimator's
own fit (a callback) would wait for itself: it gets a RuntimeError instead
(``set_params`` excepted, which the running fit does not see: it trains with
the parameters validated when it started).

Fork policy: a process forked while a thread of the parent held the lock
(a fit running in another thread) refuses to fit, save or pickle that
estimator in the child with a RuntimeError (the thread that would release
the lock does not exist there, and the model may be mid-update; hvae.Model
refuses it likewise). An estimator idle at the fork works in the child.
"""
import contextlib
import os
import threading
import weakref

_ALL_LOCKS = weakref.WeakSet()


class EstimatorLock:
    """A non-reentrant lock that knows its holder (process and thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.holder = None  # (pid, thread ident, what) while held
        self.busy_at_fork = None  # in a forked child: what the parent was doing
        _ALL_LOCKS.add(self)

    def held_by_this_thread(self):
        """Whether the calling thread holds the lock (it is in the fit)."""
        holder = self.holder
        return holder is not None and holder[:2] == (os.getpid(), threading.get_ident())

    @contextlib.contextmanager
    def hold(self, what, reentrant=False):
        """Holds the lock for ``what`` (a name for messages), waiting for a
        call of another thread to finish; RuntimeError in a child forked
        during a call, and from inside the holder's own call unless
        ``reentrant`` (a callback may save, pickle or set_params: the fit is
        paused between epochs, its state consistent)."""
        if self.busy_at_fork is not None:
            raise RuntimeError(
                f"{what}: this estimator was busy ({self.busy_at_fork}) in another thread "
                "when this process was forked from it; its model may be mid-update, so "
                "it cannot be used in this process: save or pickle it in the parent when "
                "it is idle, or use the 'spawn' start method")
        if self.held_by_this_thread():
            if reentrant:
                yield
                return
            raise RuntimeError(
                f"{what} was called on this estimator from inside its own "
                f"{self.holder[2]} (a callback or progress function); it would wait for "
                "itself. Use another estimator (sklearn.base.clone) or call it after "
                f"the {self.holder[2]} returns")
        self._lock.acquire()
        self.holder = (os.getpid(), threading.get_ident(), what)
        try:
            yield
        finally:
            self.holder = None
            self._lock.release()

    def _after_fork_in_child(self):
        if self._lock.locked():
            # Held by a thread that does not exist in this process.
            self.busy_at_fork = "in " + (self.holder[2] if self.holder else "a call")
            self._lock = threading.Lock()
            self.holder = None


def _reset_in_child():
    for lock in list(_ALL_LOCKS):
        lock._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_reset_in_child)


def estimator_lock(estimator):
    """The estimator's lock, made on first use and kept out of its
    parameters, pickles and clones (see HierarchicalVAE.__getstate__)."""
    lock = estimator.__dict__.get("_estimator_lock")
    if lock is None:
        # dict.setdefault is atomic: two threads get the same lock.
        lock = estimator.__dict__.setdefault("_estimator_lock", EstimatorLock())
    return lock
