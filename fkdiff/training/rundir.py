"""The run folder of a training run: one process at a time, never mixed with another run, files written whole.

- `RunLock`: `<run_dir>/.lock` names the process that owns the folder (pid, host, start time). It is held with
  `fcntl.flock` on filesystems that support it, so the kernel frees it when the process dies (kill -9 included);
  where flock is unavailable the file itself is the lock (created with O_EXCL) and a lock left by a process that no
  longer runs on this host is taken over (pid checked; a lock from another host cannot be checked and is reported).
  A second run into a folder in use fails at once with `RunDirBusy`, naming the owner.
- `check_fresh`: a run that does not resume refuses a folder that already holds another run's files (`RunDirNotEmpty`);
  Hydra's bookkeeping (`.hydra/`, `*.log`) does not count.
- `AtomicCheckpointIO`: Lightning's `TorchCheckpointIO` writing each checkpoint atomically (`fkdiff.files`: a temporary
  file in the same folder, then `os.replace`; Lightning's own save stages the file in the system temp folder and
  *moves* it, which is a copy, not atomic, when that folder is on another disk).
- `open_run`: the context manager of a training entry point: on the main process take the lock, refuse a folder
  holding another run unless resuming (and require one when resuming `last`); release the lock at the end.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from lightning.pytorch.plugins.io import TorchCheckpointIO

from fkdiff.files import atomic_torch_save

__all__ = ["RunDirBusy", "RunDirNotEmpty", "RunLock", "BOOKKEEPING", "run_files", "check_fresh", "is_main_process",
           "AtomicCheckpointIO", "open_run", "LOCK_NAME"]

LOCK_NAME = ".lock"
BOOKKEEPING = {".hydra", LOCK_NAME}  # besides *.log files: what Hydra and the lock put into a run folder


class RunDirBusy(RuntimeError):
    """Another live process owns the run folder."""


class RunDirNotEmpty(FileExistsError):
    """A fresh run was pointed at a folder that already holds a run."""


def is_main_process() -> bool:
    """Rank 0 of a distributed job (torchrun / srun / Lightning's DDP children set RANK or LOCAL_RANK), or a plain run."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


# ---------------------------------------------------------------------------------------------------------------------
# atomic checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, except that a checkpoint file is replaced atomically (module docstring)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        atomic_torch_save(checkpoint, path)


# ---------------------------------------------------------------------------------------------------------------------
# the lock


def _proc_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """An exclusive lock on a run folder held by this process (module docstring). Use as a context manager, or
    `acquire()` / `release()`. `owner` is what the lock file says: {"pid", "host", "started", "proc_start"}."""

    def __init__(self, run_dir: str | Path, what: str = "run"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self.took_over: dict | None = None  # the stale owner replaced, if any

    # the record of the owner
    def _record(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "proc_start": _proc_start(pid), "what": self.what}

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _busy(self, owner: dict) -> RunDirBusy:
        who = (f"process {owner.get('pid', '?')} on host {owner.get('host', '?')} (a {owner.get('what', 'run')} "
               f"started {owner.get('started', '?')})") if owner else "another process"
        return RunDirBusy(
            f"run folder {self.run_dir} is in use by {who}; lock file {self.path}. Wait for that run to end, or give "
            f"another run_dir=<folder>. Two runs in one folder would mix their checkpoints and configs.")

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux/macOS
            fcntl = None
        for _ in range(10):
            if fcntl is None:
                return self._acquire_exclusive_file()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(self._read()) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    return self._acquire_exclusive_file()  # a filesystem without flock
                raise
            try:  # the file we locked must still be the one at the path (a releasing owner unlinks it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = self._read()
            if old.get("pid") not in (None, os.getpid()):
                self.took_over = old  # flock was free: its owner is gone (the kernel freed the lock)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self._record()).encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise self._busy(self._read())

    def _acquire_exclusive_file(self) -> "RunLock":
        """Without flock: the lock is the file, created with O_EXCL; a dead owner's file (same host) is replaced."""
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._read()
                if not owner:  # being written by its creator this instant
                    time.sleep(0.05)
                    owner = self._read()
                pid = owner.get("pid")
                if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
                    raise self._busy(owner) from None
                if _alive(pid, owner.get("proc_start")):
                    raise self._busy(owner) from None
                with contextlib.suppress(FileNotFoundError):  # stale: its process is gone
                    self.path.unlink()
                self.took_over = owner
                continue
            os.write(fd, json.dumps(self._record()).encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise self._busy(self._read())

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if self._read().get("pid") == os.getpid():
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)  # closing releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------------------------------
# the folder


def run_files(run_dir: str | Path) -> list[Path]:
    """What the folder holds besides Hydra's bookkeeping, log files and the lock (i.e. another run's files)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir()
                  if p.name not in BOOKKEEPING and not (p.is_file() and p.suffix == ".log"))


def check_fresh(run_dir: str | Path, resume_key: str) -> None:
    """A run that does not resume must not write into a folder that holds another run (RunDirNotEmpty otherwise)."""
    found = run_files(run_dir)
    if found:
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise RunDirNotEmpty(
            f"run_dir {run_dir} already holds a run ({names}). Resume it with {resume_key}=last (its own saved config "
            f"is used; give only what you want to change), or start a new run in another run_dir=<folder>.")


@contextlib.contextmanager
def open_run(run_dir: str | Path, *, resume: str | None, resume_key: str, what: str = "run") -> Iterator[RunLock | None]:
    """Own `run_dir` for the duration of a run (module docstring): on the main process take the lock; unless resuming
    (`resume`: the ckpt_path value, None for a fresh run) refuse a folder holding another run, and with `resume="last"`
    require one (a typo in run_dir must not start a new run silently). Other ranks of a distributed job get None."""
    if not is_main_process():
        yield None
        return
    lock = RunLock(run_dir, what=what).acquire()
    try:
        if not resume:
            check_fresh(run_dir, resume_key)
        elif resume == "last" and not (Path(run_dir) / "config.yaml").is_file():
            raise FileNotFoundError(
                f"{resume_key}=last but {run_dir} holds no run to resume (no config.yaml): pass run_dir=<the earlier "
                f"run's folder>, or drop {resume_key} to start a new run there")
        if lock.took_over:
            o = lock.took_over
            print(f"note: {run_dir} was locked by process {o.get('pid')} on {o.get('host')}, which is no longer "
                  f"running (killed?); this run takes the folder over.")
        yield lock
    finally:
        lock.release()
