"""The on-disk cache of generated modules and compiled kernels: nothing it holds runs unless rcc
wrote it for that key.

- The directory must be the user's own and writable by nobody else (created 0700): a shared or
  world-writable cache would let another user plant code that runs in this process.
- A generated module is compared with the code rcc has in memory before it is imported (a planted
  or truncated file is rewritten); a compiled kernel is loaded only if its SHA-256 matches the one
  recorded beside it when rcc built it (else it is rebuilt).
- Concurrent processes building one kernel take a file lock: one compiles, the others load.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile


def cache_dir() -> str:
    return os.environ.get("RCC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rcc")


def private_dir(path: str) -> str:
    """`path`, created 0700 if missing; refused if another user owns it or others may write it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise PermissionError(f"rcc's cache directory {path} belongs to another user (uid "
                              f"{info.st_uid}); rcc will not load code from it: set RCC_CACHE_DIR "
                              "to a directory of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"rcc's cache directory {path} is writable by others (mode "
                              f"{stat.S_IMODE(info.st_mode):o}); rcc will not load code from it: "
                              f"chmod go-w {path}, or set RCC_CACHE_DIR to a private directory")
    return path


def write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def hold(path: str, text: str) -> None:
    """Make `path` hold exactly `text`: rewritten (atomically) where it is missing or differs, so
    a planted or truncated file is replaced."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except (OSError, UnicodeDecodeError):
        pass
    write_atomic(path, text.encode())


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def record(path: str) -> None:
    """Record the SHA-256 of a file rcc just wrote, beside it."""
    write_atomic(path + ".sha256", digest(path).encode())


def intact(path: str) -> bool:
    """Whether `path` exists and is the file rcc recorded (record) when it wrote it."""
    try:
        with open(path + ".sha256", encoding="ascii") as f:
            return f.read().strip() == digest(path)
    except OSError:
        return False


@contextlib.contextmanager
def locked(path: str):
    """An exclusive lock on `path`.lock (where the platform has flock; else no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
