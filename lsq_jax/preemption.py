"""SIGTERM (a preemption notice) at any moment.

While the run holds work that a save would keep (`unsaved`: the training loop says when), SIGTERM only
sets a flag that the loop reads between steps (`requested`), so that it saves the step it reached first.
Otherwise there is nothing to save: SIGTERM raises `Preempted` in the main thread, and rerunning the same
command resumes.

A Python signal handler runs in the main thread when it next runs Python, or when a call into C checks
for signals. An XLA compilation does: the exception leaves it running in its own thread, where it holds
the interpreter's exit until it ends (minutes, for a large model) and then crashes it; `exit` ends such a
process at once. A call into C that does not check (a long device step, a large host computation) keeps
the handler waiting, so `install` also has the signal written to a pipe (`signal.set_wakeup_fd`) that a
watcher thread reads: when the main thread has not taken the signal within GRACE_S and nothing is
unsaved, the watcher runs the cleanups registered with `on_exit` (an in-flight checkpoint is finished,
the workdir lock released), says "nothing to save" and ends the process with status 0.

Single-process runs only: in a multi-process run JAX's own preemption notifier (started by
jax.distributed.initialize) must see the signal, so that every process stops at the same step.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

GRACE_S = 1.0  # how long the watcher leaves a SIGTERM to the main thread
NOTHING_TO_SAVE = "preempted (SIGTERM): nothing to save; run the same command to resume"


class Preempted(Exception):
    """SIGTERM with nothing unsaved (start-up, evaluation, right after a checkpoint): resume by rerunning."""


class _Watch:
    """What the handler, the watcher thread and the run share while installed."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.requested = False  # a SIGTERM reached the main thread while work was unsaved
        self.unsaved = False  # the run holds work that the next save would keep
        self.cleanups: list[Callable[[], None]] = []
        self.taken = threading.Event()  # the main thread's handler ran
        self.exiting = threading.Event()  # the watcher is ending the process
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous_handler = signal.signal(signal.SIGTERM, self.handler)
        self.previous_wakeup_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self.watch, name="sigterm-watcher", daemon=True)
        self.thread.start()

    def handler(self, signum, frame) -> None:
        del signum, frame
        self.taken.set()
        if self.exiting.is_set():  # the watcher is finishing: let it end the process
            threading.Event().wait()
        if self.unsaved:
            self.requested = True
            return
        global _raised
        _raised = True  # maybe out of a call into C that goes on
        raise Preempted

    def watch(self) -> None:
        while True:
            try:
                received = os.read(self.read_fd, 64)
            except OSError:
                return
            if not received:  # uninstalled
                return
            if signal.SIGTERM not in received:
                continue
            if self.taken.wait(GRACE_S):
                # Python runs the handler once for the signals that arrived before it could run: those
                # already written to the pipe are the ones this run took, or that the next one takes
                self.taken.clear()
                self.drain()
                continue
            if self.unsaved:
                self.log("SIGTERM: saving once the current computation returns")
                continue
            self.exit()

    def drain(self) -> None:
        """Read what the pipe holds now, without waiting."""
        os.set_blocking(self.read_fd, False)
        try:
            while os.read(self.read_fd, 64):
                pass
        except BlockingIOError:
            pass
        finally:
            os.set_blocking(self.read_fd, True)

    def exit(self) -> None:
        self.exiting.set()
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception:  # noqa: BLE001 -- the process ends either way; the rest must still run
                pass
        self.log(f"{NOTHING_TO_SAVE} (the signal came during a long computation)")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def close(self) -> None:
        signal.set_wakeup_fd(self.previous_wakeup_fd)
        signal.signal(signal.SIGTERM, self.previous_handler)
        os.close(self.write_fd)  # the watcher reads end-of-file and returns
        self.thread.join()
        os.close(self.read_fd)


_watch: _Watch | None = None
_raised = False  # a handler of this process raised Preempted


def install(log: Callable[[str], None] = print) -> None:
    """From now on SIGTERM sets the flag `requested` reads while work is unsaved, and otherwise raises
    Preempted, or (during a long call into C that does not check for signals) ends the process; see the
    module's docstring. A no-op in a multi-process run (call it after jax.distributed has started).
    `uninstall` puts back what was there."""
    global _watch
    import jax  # here: importing this module stays cheap (main's --help)

    if _watch is None and jax.process_count() == 1:
        _watch = _Watch(log)


def uninstall() -> None:
    global _watch
    if _watch is not None:
        _watch.close()
        _watch = None


def exit(status: int) -> NoReturn:  # noqa: A001 -- the program's exit, as sys.exit
    """End the program with `status`: through the interpreter's shutdown after a run that ended well, at once
    after a failure (status != 0) or a SIGTERM. Then threads may still run (an XLA compilation the handler
    interrupted; Orbax's writers after a failed save): the shutdown would wait for them, print their
    errors, and can crash."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status or _raised:
        os._exit(status)
    sys.exit(status)


def requested() -> bool:
    """Whether a SIGTERM arrived while work was unsaved (the loop then saves and stops)."""
    return _watch is not None and _watch.requested


def unsaved(value: bool) -> None:
    """Say whether the run now holds work that the next save would keep (the watcher then waits)."""
    if _watch is not None:
        _watch.unsaved = value


@contextlib.contextmanager
def on_exit(cleanup: Callable[[], None]) -> Iterator[None]:
    """Within the block, `cleanup` runs before the watcher ends the process."""
    if _watch is None:
        yield
        return
    _watch.cleanups.append(cleanup)
    try:
        yield
    finally:
        if _watch is not None and cleanup in _watch.cleanups:
            _watch.cleanups.remove(cleanup)
