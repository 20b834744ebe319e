"""Small helpers shared across the package."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are for everyone the umask allows
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------- signals
class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that the same cleanup runs on the way out
    (temporary folders removed, files closed) and the command exits 143 instead of dying mid-write."""

    signum = signal.SIGTERM


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's code for a command stopped by a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread for the duration of the block (elsewhere: no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back during a few renames that must happen together, then deliver them:
    an interrupt between replacing an old folder and putting the new one in place would lose both."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in pending:
            os.kill(os.getpid(), sig)


# ---------------------------------------------------------------------------------- output folders
@contextmanager
def writing_folder(path: Path, marker: str, kind: str) -> Iterator[Path]:
    """A temporary folder beside `path`, renamed into place when the block ends without an error or
    an interrupt, removed otherwise: `path` never holds half an output. An existing `path` is replaced
    only when it is empty or is a `kind` folder already (it holds the file `marker`)."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / marker).exists())):
        raise ValueError(f"refusing to overwrite {path}: it exists and is not a {kind} folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        _publish_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_folder(new: Path, path: Path) -> None:
    umask = _umask()
    new.chmod(0o777 & ~umask)  # mkdtemp made it private; results get the usual permissions
    for f in new.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    with signals_deferred():
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
            os.replace(new, path)
            shutil.rmtree(old)
        else:
            os.replace(new, path)
