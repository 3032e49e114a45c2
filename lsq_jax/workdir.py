"""The workdir of a run: where it is (absolute; cloud URLs as they are), which process writes it (`Workdir`),
whether it can be written, the lock that keeps a second run out of it, and what a full disk looks like.
Orbax is checkpoint.py's."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import jax
from etils import epath

from lsq_jax import preemption


def is_writer() -> bool:
    """Whether this process writes the run's files and prints its lines: process 0 (in a multi-process run
    every process computes, and one writes)."""
    return jax.process_index() == 0


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)  # the errors of a write to a full disk or quota


class WorkdirError(Exception):
    """A workdir that cannot be used: not a directory, not writable, full, or in use by another run."""


def os_error_line(err: OSError, path=None, doing: str = "") -> str:
    """One line: what was being done to the path (`path`, else the error's own), and the reason."""
    path = path if path is not None else err.filename
    reason = err.strerror or str(err) or type(err).__name__
    full = "; free some space or use another --workdir" if err.errno in FULL_DISK else ""
    return f"{doing}{path}: {reason}{full}" if path is not None else f"{reason}{full}"


@contextlib.contextmanager
def writing(path) -> Iterator[None]:
    """Within the block, an OSError is WorkdirError naming `path` and the reason."""
    try:
        yield
    except OSError as err:
        raise WorkdirError(os_error_line(err, path, "cannot write ")) from None


def write_atomically(path, text: str) -> None:
    """Replace the file `path` whole (locally a temporary file beside it, then a rename): a failure leaves
    the earlier file as it was and no partial one. WorkdirError naming the path."""
    path = epath.Path(path)
    with writing(path):
        if "://" in str(path):  # an object store replaces the object whole
            path.write_text(text)
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text)
            os.replace(os.fspath(tmp), os.fspath(path))
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


# the URL schemes a workdir may have, each with the package that gives it a filesystem (the `cloud` extra)
URL_FILESYSTEMS = {"gs": "gcsfs", "s3": "s3fs"}


def check_url_scheme(workdir: str) -> None:
    """WorkdirError unless a URL workdir's scheme is one of URL_FILESYSTEMS and its package is installed."""
    if "://" not in workdir:
        return
    scheme = workdir.split("://", 1)[0]
    if scheme not in URL_FILESYSTEMS:
        raise WorkdirError(f"--workdir={workdir}: {scheme}:// is not supported; allowed: a local path, "
                           + " or ".join(f"{s}://BUCKET/PATH" for s in URL_FILESYSTEMS))
    try:
        import fsspec
        fsspec.get_filesystem_class(scheme)
    except ImportError:
        raise WorkdirError(f"--workdir={workdir}: {scheme}:// needs the {URL_FILESYSTEMS[scheme]} package, "
                           "which is not installed (pip install -e '.[cloud]')") from None


def resolve_workdir(workdir: str) -> epath.Path:
    """The --workdir as an absolute path (local paths against the current directory; URLs such as gs://
    unchanged): Orbax refuses relative paths, and a run that changes directory must not move its files.
    WorkdirError when it exists and is not a directory, or is a URL no installed filesystem serves."""
    check_url_scheme(str(workdir))
    path = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(os.path.expanduser(str(workdir))))
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"--workdir: {path} exists and is not a directory")
    return path


RELEASE_NOTE = "RELEASE.md"  # a released checkpoint's description: its folder is read, never written


def eval_dir(workdir: epath.Path, elsewhere: str) -> epath.Path:
    """Where --mode=eval writes its report: <workdir>/eval, or for a released checkpoint (one whose folder
    holds RELEASE_NOTE) <elsewhere>/eval."""
    return resolve_workdir(elsewhere) / "eval" if (workdir / RELEASE_NOTE).exists() else workdir / "eval"


def check_writable(directory) -> None:
    """Create `directory` (and its parents) and write and remove a probe file in it, or raise WorkdirError."""
    directory = epath.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise WorkdirError(f"{directory} exists and is not a directory")
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise WorkdirError(f"{directory} is not writable ({err.strerror or type(err).__name__})") from None


LOCK_NAME = "lock"
LOCK_HEARTBEAT_S = 30.0  # how often a running job rewrites the time in its lock file
LOCK_STALE_S = 600.0  # a lock of another host whose time is older than this belongs to no live run


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """<workdir>/lock: {"pid", "host", "time"} of the run that trains in the workdir.

    `acquire` refuses a workdir whose lock belongs to a live run, and takes over a stale one: a dead pid
    on this host, or a time older than LOCK_STALE_S (a run on another host that was killed without
    cleaning up; a live run rewrites the time every LOCK_HEARTBEAT_S from a background thread). Locally
    the lock file is created atomically (O_EXCL); on object stores (gs://) creation is check-then-write.
    """

    def __init__(self, workdir, *, heartbeat_s: float = LOCK_HEARTBEAT_S, stale_s: float = LOCK_STALE_S):
        self.path = epath.Path(workdir) / LOCK_NAME
        self._heartbeat_s, self._stale_s = heartbeat_s, stale_s
        self._stop = threading.Event()
        self._thread = None

    def _record(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})

    def holder(self) -> dict | None:
        """The lock's record, {} for an unreadable one, None when there is no lock."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def is_stale(self, record: dict) -> bool:
        if not record:
            return True
        if record.get("host") == socket.gethostname():
            return not _pid_alive(int(record.get("pid", -1)))
        return time.time() - float(record.get("time", 0)) > self._stale_s

    def _create(self) -> bool:
        if "://" not in str(self.path):
            try:
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(self._record())
            except BaseException:  # no empty lock left behind (a full disk)
                self.path.unlink()
                raise
            return True
        if self.path.exists():
            return False
        self.path.write_text(self._record())
        return True

    def acquire(self, log=print) -> None:
        for _ in range(3):
            with writing(self.path):
                created = self._create()
            if created:
                break
            record = self.holder()
            if record is None:
                continue  # released in between
            if not self.is_stale(record):
                raise WorkdirError(
                    f"{self.path.parent} is in use by another run (pid {record.get('pid')} on "
                    f"{record.get('host')}); wait for it to end, or use another --workdir (if no run uses it, "
                    f"delete {self.path})")
            log(f"warning: taking over the stale lock of pid {record.get('pid')} on {record.get('host')}")
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        else:
            raise WorkdirError(f"could not take the lock {self.path}: another run keeps creating it")
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                self._rewrite()
            except WorkdirError:  # a full disk for a while: the record keeps its older time
                pass

    def _rewrite(self) -> None:
        """Refresh the time, so that a reader never sees a half-written record."""
        write_atomically(self.path, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            try:
                self.path.unlink()
            except OSError:
                pass


class Workdir:
    """A run's folder (local or cloud) that knows which process writes it: the writing process (`is_writer`)
    writes config.json, metrics.jsonl and the report's folder, prints the run's lines and holds the lock;
    on every other process these are no-ops, so no caller asks which process it is.

    Attributes:
        path: the folder (resolve_workdir).
        writer: whether this process writes.
    """

    def __init__(self, path, *, writer: bool | None = None):
        self.path = epath.Path(path)
        self.writer = is_writer() if writer is None else writer

    def __truediv__(self, name) -> epath.Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def writes(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the writing process; None on the others."""
        return fn(*args, **kwargs) if self.writer else None

    def log(self, fn):
        """`fn` on the writing process, a no-op on the others: `log = workdir.log(print)`."""
        def call(*args, **kwargs):
            self.writes(fn, *args, **kwargs)
        return call

    def write(self, path, text: str) -> None:
        """Replace the file `path` whole (write_atomically)."""
        self.writes(write_atomically, path, text)

    def append(self, path, text: str) -> None:
        """Add `text` at the end of the file `path` (an object store rewrites the object)."""
        self.writes(_append, epath.Path(path), text)

    def check_writable(self, directory) -> None:
        """check_writable(directory), on the writing process."""
        self.writes(check_writable, directory)

    @contextlib.contextmanager
    def claimed(self, log=print):
        """The workdir held by one training run: the writing process checks that it is writable and holds
        its lock (WorkdirLock) until the block ends."""
        lock = WorkdirLock(self.path)
        self.check_writable(self.path)
        self.writes(lock.acquire, log)
        try:
            self.check_writable(self.path / "checkpoints")  # at the start, not at the first save
            with preemption.on_exit(lock.release):
                yield
        finally:
            lock.release()


def _append(path: epath.Path, text: str) -> None:
    with writing(path):
        if "://" in str(path):  # object stores (gs://, s3://) cannot append: rewrite the object
            path.write_text((path.read_text() if path.exists() else "") + text)
        else:
            with path.open("a") as f:
                f.write(text)
