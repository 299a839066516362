"""Atomic file writes (a reader never sees a half-written file, whatever interrupts the writer) and a folder lock
(two runs never write into one output folder at once)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], mode: int | None = 0o644) -> str:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it into place (same file system, so the
    rename is atomic). On any error the temp file is removed and ``path`` is untouched. Returns ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line, flushed and fsynced. If the file ends without a newline (a write torn by a
    kill), a newline goes first, so the new record never joins the torn line (which a reader then skips)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = json.dumps(record) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def exclusive_folder(folder: str | os.PathLike, what: str = "output_dir"):
    """Hold ``<folder>/.fish-tune.lock`` (this process's pid) for the block: a second process writing to the same
    folder at the same time is refused (``FileExistsError`` naming the holder) instead of silently overwriting the
    first one's results. A lock left by a process that no longer runs is taken over. Under torchrun only rank 0
    holds it (every rank of one run writes to the same folder)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".fish-tune.lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            check_folder_free(folder, what)
            os.remove(path)  # stale: its process is gone
    else:  # pragma: no cover - another process won the race twice
        raise FileExistsError(f"{what} {folder} is in use by another fish-tune process; choose another {what}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def check_folder_free(folder: str | os.PathLike, what: str = "output_dir") -> None:
    """Raise ``FileExistsError`` if a running process holds ``folder``'s lock (creates nothing)."""
    holder = _holder(os.path.join(folder, ".fish-tune.lock"))
    if holder:
        raise FileExistsError(f"{what} {folder} is in use by another fish-tune process (pid {holder}); wait for it "
                              f"to finish or choose another {what}")


def _holder(path: str) -> int:
    """The pid of a live process holding the lock file at ``path``, else 0."""
    try:
        with open(path, encoding="utf-8") as f:
            pid = int(f.read().strip() or "0")
    except (OSError, ValueError):
        return 0
    return pid if pid > 0 and _alive(pid) else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
