"""Debian packages the process tests need: the binary on this machine, or the package
installed with apt-get where that is possible (as root); the test is skipped where it is not."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

import pytest

APT_TIMEOUT_S = 300


def find(name: str, places: Sequence[str]) -> str | None:
    """``name`` on PATH, else the first executable of ``places`` (sbin is often not on PATH)."""
    return shutil.which(name) or next((p for p in places if os.access(p, os.X_OK)), None)


def binary(package: str, places: Sequence[str], needed_by: str) -> str:
    """The path of Debian's ``package`` binary (named as the package), installed here if
    missing; skips the test where it cannot be installed (no root, no apt-get, apt fails)."""
    path = find(package, places)
    if path:
        return path
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip(f"{package} is not installed and cannot be installed here (needs root and "
                    f"apt-get): install Debian's `{package}` package to run {needed_by}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    output = ""
    for command in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", package]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=APT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`{' '.join(command)}` did not finish within {APT_TIMEOUT_S} s: "
                        f"cannot install {package} here")
        output += done.stdout[-2000:] + done.stderr[-2000:]
        if done.returncode != 0:
            pytest.skip(f"`{' '.join(command)}` failed ({done.returncode}), cannot install "
                        f"{package} here:\n{output}")
    path = find(package, places)
    if not path:
        pytest.skip(f"apt-get installed no {package} binary:\n{output}")
    return path
