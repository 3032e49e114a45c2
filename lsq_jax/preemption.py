"""SIGTERM (a preemption notice) and SIGINT (Ctrl-C) at any moment: the run saves what is unsaved and ends.

While the run holds work that a save would keep (`unsaved`: the training loop says when), a signal only
sets a flag that the loop reads between steps (`requested`), so that it saves the step it reached first.
Otherwise there is nothing to save: the signal raises `Preempted` in the main thread, and rerunning the same
command resumes. Either way the process ends with `status()`: 0 after SIGTERM (a scheduler's notice: the
job can be requeued), 130 after SIGINT (the shell's status for Ctrl-C). A second signal changes nothing:
the process still ends once what is being saved is saved, with the status of the first.

A Python signal handler runs in the main thread when it next runs Python, or when a call into C checks
for signals. An XLA compilation does: the exception leaves it running in its own thread, where it holds
the interpreter's exit until it ends (minutes, for a large model) and then crashes it; `exit` ends such a
process at once. An exception raised where Python cannot pass it on (a weakref callback, a destructor)
is lost, and a call into C that does not check (a long device step, a large host computation) keeps the
handler waiting. So `install` also has the signal written to a pipe (`signal.set_wakeup_fd`) that a
watcher thread reads: when GRACE_S after the signal (UNWIND_S after a Preempted on its way, not lost)
the main thread has not acted on it (`requested` returned true, or the caller caught Preempted and said
so with `stopping` or `exit`) and nothing is unsaved, the watcher runs the cleanups
registered with `on_exit` (an in-flight checkpoint is finished, the workdir lock released), says "nothing
to save" and ends the process.

Before `install` (imports, flags, JAX's start-up: nothing is written yet), `install_early` makes either
signal end the process at once with one line and the same status.

Single-process runs only: in a multi-process run JAX's own preemption notifier (started by
jax.distributed.initialize) must see SIGTERM, so that every process stops at the same step.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import NoReturn

GRACE_S = 1.0  # how long the watcher leaves a signal to the main thread
UNWIND_S = 10.0  # how long it leaves a raised Preempted (not reported lost) to reach the main thread's caller
# (what it says, exit status); SIGTERM's handler last: once Python (SigCgt) shows it, both are in place
SIGNALS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("preempted", 0)}


class Preempted(BaseException):
    """A signal with nothing unsaved (start-up, evaluation, right after a checkpoint): resume by rerunning.
    Not an Exception, so that no `except Exception` on the way (Orbax's, a fallback's) takes it for a
    failure."""


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def nothing_to_save_line(signum: int) -> str:
    return f"{SIGNALS[signum][0]} ({_name(signum)}): nothing to save; run the same command to resume"


class _Watch:
    """What the handler, the watcher thread and the run share while installed."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.signum: int | None = None  # the first signal, as the handler or the watcher saw it
        self.handled = False  # the main thread's handler ran
        self.raised: float | None = None  # when it raised Preempted
        self.lost = False  # Python could not pass that exception on
        self.acting = False  # the main thread acts on the signal (saves and stops, or ends)
        self.unsaved = False  # the run holds work that the next save would keep
        self.cleanups: list[Callable[[], None]] = []
        self.exiting = threading.Event()  # the watcher is ending the process
        self.deciding = threading.RLock()  # who ends the process: the watcher, or the main thread (`act`)
        self.closed = threading.Event()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous_handlers = {s: signal.signal(s, self.handler) for s in SIGNALS}
        self.previous_wakeup_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = self.unraisable
        self.thread = threading.Thread(target=self.watch, name="signal-watcher", daemon=True)
        self.thread.start()

    def received(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum

    def handler(self, signum, frame) -> None:
        self.received(signum)
        if self.exiting.is_set():  # the watcher is finishing: let it end the process
            threading.Event().wait()
        if self.handled or self.acting or self.unsaved:  # a second signal, or the loop saves first
            self.handled = True
            return
        self.handled = True
        self.raised = time.monotonic()
        _interrupted.append(frame)
        raise Preempted

    def unraisable(self, unraisable) -> None:
        """Quiet about a Preempted that Python could not pass on (raised in a weakref callback): the watcher
        acts on its signal."""
        if isinstance(unraisable.exc_value, Preempted):
            self.lost = True
        else:
            self.previous_unraisablehook(unraisable)

    def watch(self) -> None:
        while True:
            try:
                received = os.read(self.read_fd, 64)
            except OSError:
                return
            if not received:  # uninstalled
                return
            signums = [s for s in received if s in SIGNALS]
            if not signums or self.exiting.is_set():
                continue
            self.received(signums[0])
            self.follow(time.monotonic() + GRACE_S)

    def follow(self, deadline: float) -> None:
        """Until the main thread acts on the signal; past `deadline` (UNWIND_S after a Preempted that was not
        lost: the main thread's `finally` blocks may finish a save) with nothing unsaved, end the process."""
        told = False
        while not self.closed.wait(0.05):
            if self.acting:
                return
            unwinding = self.raised is not None and not self.lost
            if time.monotonic() < (self.raised + UNWIND_S if unwinding else deadline):
                continue
            if not self.unsaved:
                with self.deciding:
                    if self.acting:
                        return
                    self.exiting.set()
                self.exit()
            if not told:
                self.log(f"{_name(self.signum)}: saving once the current computation returns")
                told = True

    def act(self) -> None:
        """The main thread acts on the signal; when the watcher is already ending the process, it waits for
        that."""
        with self.deciding:
            if not self.exiting.is_set():
                self.acting = True
                return
        threading.Event().wait()

    def exit(self) -> None:
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except BaseException:  # noqa: BLE001 -- the process ends either way; the rest must still run
                pass
        self.log(f"{nothing_to_save_line(self.signum)} (the signal came during a long computation)")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(SIGNALS[self.signum][1])

    def close(self) -> None:
        self.closed.set()
        signal.set_wakeup_fd(self.previous_wakeup_fd)
        sys.unraisablehook = self.previous_unraisablehook
        for signum, previous in self.previous_handlers.items():
            signal.signal(signum, previous)
        os.close(self.write_fd)  # the watcher reads end-of-file and returns
        self.thread.join()
        os.close(self.read_fd)


_watch: _Watch | None = None
# The frames a Preempted left, kept until the process ends: an XLA compilation the signal interrupted goes on in
# its own thread and reads the module its callers' frames hold; freeing them while it runs crashes the process.
_interrupted: list = []
_early: dict[int, object] = {}  # the handlers install_early replaced, put back by uninstall
_signum: int | None = None  # the signal this process is ending for, once uninstalled


def _early_handler(signum, frame) -> NoReturn:
    del frame
    sys.stderr.write(f"{SIGNALS[signum][0]} ({_name(signum)}) while starting: nothing written; "
                     "run the same command to start\n")
    sys.stderr.flush()
    os._exit(SIGNALS[signum][1])


def install_early() -> None:
    """Until `install`, SIGTERM or SIGINT ends the process at once with one line and `status()`'s status
    (nothing has been written yet). `uninstall` puts back what was there."""
    for signum in SIGNALS:
        previous = signal.signal(signum, _early_handler)
        _early.setdefault(signum, previous)


def install(log: Callable[[str], None] = print) -> None:
    """From now on SIGTERM and SIGINT set the flag `requested` reads while work is unsaved, and otherwise
    raise Preempted, or (when that does not end the run within GRACE_S) end the process; see the module's
    docstring. In a multi-process run only the handlers of `install_early` are put back (call it after
    jax.distributed has started). `uninstall` puts back what was there."""
    global _watch, _signum
    import jax  # here: importing this module stays cheap (main's --help)

    if _watch is not None:
        return
    _signum = None
    if jax.process_count() == 1:
        _watch = _Watch(log)
    else:  # jax.distributed.initialize gave SIGTERM to JAX's notifier, under Python's record of a handler
        _early.pop(signal.SIGTERM, None)
        _put_back_early()


def _put_back_early() -> None:
    for signum, previous in _early.items():
        if signal.getsignal(signum) is _early_handler:
            signal.signal(signum, previous)
    _early.clear()


def uninstall() -> None:
    """Put back the handlers from before `install_early` and `install`."""
    global _watch, _signum
    if _watch is not None:
        _signum = _signum or _watch.signum
        _watch.close()
        _watch = None
    _put_back_early()


def signum() -> int | None:
    """The signal this process received while installed (the first), or None."""
    return _watch.signum if _watch is not None else _signum


def status() -> int:
    """The exit status for the signal received: 0 for SIGTERM (or none), 130 for SIGINT."""
    return SIGNALS[signum()][1] if signum() is not None else 0


def saved_line(step: int) -> str:
    """What a run that saved `step` and stopped for a signal says (multi-process: Orbax's preemption point)."""
    word = SIGNALS[signum()][0] if signum() is not None else "preempted"
    return f"{word}: saved step {step}; run the same command to resume"


def nothing_to_save() -> str:
    """What a run that stopped for a signal with nothing unsaved says."""
    return nothing_to_save_line(signum() or signal.SIGTERM)


def stopping() -> None:
    """The main thread ends the run for the signal received (it caught Preempted): the watcher leaves it to
    it, and a second signal changes nothing."""
    if _watch is not None:
        _watch.act()


def guarded(main: Callable[..., int], *args, **kwargs) -> int:
    """main(...), or 1 after printing the traceback of a bug it raised (then `exit` waits for no thread)."""
    try:
        return main(*args, **kwargs)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1


def exit(status: int) -> NoReturn:  # noqa: A001 -- the program's exit, as sys.exit
    """End the program with `status`: through the interpreter's shutdown after a run that ended well, at once
    after a failure (status != 0) or a signal. Then threads may still run (an XLA compilation the handler
    interrupted; Orbax's writers after a failed save): the shutdown would wait for them, print their
    errors, and can crash, or hang."""
    stopping()
    sys.stdout.flush()
    sys.stderr.flush()
    if status or signum() is not None:
        os._exit(status)
    sys.exit(status)


def requested() -> bool:
    """Whether a signal arrived (the loop then saves and stops: from then on the watcher leaves the signal
    to it)."""
    if _watch is None or _watch.signum is None:
        return False
    _watch.act()
    return True


def unsaved(value: bool) -> None:
    """Say whether the run now holds work that the next save would keep (the watcher then waits). Nothing
    unsaved while a signal waits for the loop that did not see it: a point to act on it, raising Preempted."""
    if _watch is None:
        return
    _watch.unsaved = value
    if not value and _watch.signum is not None and not _watch.acting:
        _watch.act()
        raise Preempted


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
