"""Debian packages the process tests need: the binary on this machine, or the package
installed with apt-get where that is possible (as root); the test is skipped where it is not."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence

import pytest

APT_TIMEOUT_S = 300
# Test workers (pytest-xdist) may want packages at the same time; dpkg takes one at a time.
APT_LOCK = "/tmp/xrates-tests-apt.lock"


@contextlib.contextmanager
def _apt_turn() -> Iterator[None]:
    """One installer at a time across this machine's test workers."""
    with open(APT_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def find(name: str, places: Sequence[str]) -> str | None:
    """``name`` on PATH, else the first executable of ``places`` (sbin is often not on PATH)."""
    return shutil.which(name) or next((p for p in places if os.access(p, os.X_OK)), None)


def binary(package: str, places: Sequence[str], needed_by: str) -> str:
    """The path of Debian's ``package`` binary (named as the package), installed here if
    missing; skips the test where it cannot be installed (no root, no apt-get, apt fails)."""
    path = find(package, places)
    if path:
        return path
    reason = ensure([package], lambda: find(package, places) is not None)
    if reason:
        pytest.skip(f"{package} is not installed and cannot be installed here ({reason}): "
                    f"install Debian's `{package}` package to run {needed_by}")
    path = find(package, places)
    if not path:
        pytest.skip(f"apt-get installed no {package} binary; needed by {needed_by}")
    return path


def ensure(packages: Sequence[str], present: Callable[[], bool]) -> str | None:
    """Install ``packages`` unless ``present()`` (asked again once it is this worker's turn:
    another may have installed them meanwhile). None when they are there, else why not."""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return "needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _apt_turn():
        if present():
            return None
        for command in (["apt-get", "update"],
                        ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True,
                                      timeout=APT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return f"`{' '.join(command)}` did not finish within {APT_TIMEOUT_S} s"
            if done.returncode != 0:
                return (f"`{' '.join(command)}` failed ({done.returncode}):\n"
                        f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return None
