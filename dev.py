#!/usr/bin/env python3
"""The two commands of xrates, for a fresh machine with nothing but Python 3.11+.

    python3 dev.py up      # embedded PostgreSQL + updater (demo source) + API on :8000 and :8001
    python3 dev.py test    # lint (ruff), types (mypy), then the whole test suite (real
                           # PostgreSQL, real processes)

Both create `.venv` on first use and install the pinned dependencies into it
(re-installing only when a requirements file changes), then run the real thing
inside it. Extra arguments after `test` go to pytest (after ``-n 2``: two test workers,
pytest-xdist; ``-n 0`` runs everything in one process, e.g. for a single test).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".xrates-requirements"


def _requirements_digest() -> str:
    digest = hashlib.sha256()
    for name in ("requirements.txt", "requirements-dev.txt", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    """Create .venv and install the pinned requirements unless already current."""
    if sys.version_info < (3, 11):  # noqa: UP036 - a clear message on an old Python
        sys.exit("xrates needs Python 3.11 or newer")
    wanted = _requirements_digest()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return
    pip = [str(PYTHON), "-m", "pip"]
    if not PYTHON.exists():
        print("dev.py: creating .venv", flush=True)
        try:
            venv.EnvBuilder(with_pip=True).create(VENV)
        except subprocess.CalledProcessError:
            # Some distributions ship Python without ensurepip (Debian: python3-venv): make
            # the venv without pip and let this Python's own pip install into it.
            venv.EnvBuilder(with_pip=False, clear=True).create(VENV)
    if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
        pip = [sys.executable, "-m", "pip", "--python", str(PYTHON)]
        if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
            sys.exit("dev.py: no pip for .venv: install your distribution's python3-venv "
                     "(or python3-pip) package, delete .venv and run this again")
    print("dev.py: installing pinned dependencies into .venv", flush=True)
    subprocess.run(
        [*pip, "install", "--quiet", "--disable-pip-version-check",
         "-r", str(ROOT / "requirements-dev.txt"), "-c", str(ROOT / "constraints.txt")],
        check=True,
    )
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "help"
    if command not in ("up", "test"):
        print(__doc__)
        return 0 if command in ("help", "-h", "--help") else 2
    ensure_venv()
    os.chdir(ROOT)
    if command == "up":
        args = [str(PYTHON), "admin.py", "up", *argv[1:]]
    else:
        for check in (["-m", "ruff", "check", "."], ["-m", "mypy"]):
            print(f"dev.py: {' '.join(check[1:])}", flush=True)
            if subprocess.run([str(PYTHON), *check]).returncode != 0:
                return 1
        args = [str(PYTHON), "-m", "pytest", "-n", str(test_workers()), *argv[1:]]
    os.execv(args[0], args)
    return 0  # not reached


def test_workers() -> int:
    """Two pytest workers (each with its own PostgreSQL) where there are two cores: most
    tests wait on servers, so two halve the suite's time; a fixed count, not one per core,
    keeps the load that the timing-bound tests see the same on a bigger machine."""
    return 2 if (os.cpu_count() or 1) >= 2 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
