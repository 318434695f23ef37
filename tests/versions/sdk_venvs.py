"""One small virtual environment per released `tinker` client, built once and reused.

Every released client from 0.34 on declares the same dependencies (httpx, pydantic,
transformers, ...), all of which the dev venv already holds. So a version's venv is a bare
`python -m venv --without-pip` whose site-packages holds only that `tinker` (and its
`tinker` console script), plus a .pth line that appends the dev venv's site-packages after
it: its own `tinker` wins, everything else is shared. pip (the dev venv's, pointed at the
version's interpreter with --python) installs the client there, then resolves its
requirements against that combined path, so a client that pinned something the dev venv
lacks would get its own copy; the dev venv itself is never written to.

The venvs live at `.data/sdk-versions/tinker-X.Y.Z` (gitignored). A stamp records the
version, the interpreter and the shared site-packages; it is written last, so an
interrupted build is redone. `make sdk-versions` (or `python tests/versions/sdk_venvs.py`)
builds them all; a built one costs nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT = Path(os.environ.get("TINKERD_SDK_VERSIONS_DIR", REPO / ".data" / "sdk-versions"))
# Every released client this server answers (there was no 0.37); the last is the dev venv's.
VERSIONS = ["0.34.0", "0.35.0", "0.36.0", "0.38.0"]


def venv_dir(version: str) -> Path:
    return ROOT / f"tinker-{version}"


def venv_python(version: str) -> Path:
    return venv_dir(version) / "bin" / "python"


def venv_cli(version: str) -> Path:
    return venv_dir(version) / "bin" / "tinker"


def _shared_site_packages() -> str:
    return next(p for p in site.getsitepackages() if p.endswith("site-packages"))


def _fingerprint(version: str) -> str:
    return json.dumps({"tinker": version, "python": sys.version_info[:2], "shared": _shared_site_packages()})


def is_ready(version: str) -> bool:
    stamp = venv_dir(version) / ".tinkerd-stamp"
    return stamp.exists() and stamp.read_text().strip() == _fingerprint(version) and venv_python(version).exists()


def ensure_venv(version: str, log=print) -> Path:
    """Build (or reuse) the venv of one client version and return its python. Safe to call concurrently."""
    venv = venv_dir(version)
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / f".tinker-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(version):
            return venv_python(version)
        started = time.time()
        if venv.exists():
            shutil.rmtree(venv)
        # The base interpreter, not the dev venv's, so only the .pth below links the two.
        base_python = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True)
        py = venv_python(version)
        own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
        Path(own, "tinkerd-shared.pth").write_text(_shared_site_packages() + "\n")
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("PYTHONPATH", None)
        log(f"[sdk-versions] pip install tinker=={version} into {venv}")
        pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-warn-conflicts"]
        # Its own copy even where the shared one is the same version, so every venv has its
        # own `tinker` console script; then its requirements, resolved over the combined path.
        subprocess.run([*pip, "--no-deps", "--ignore-installed", f"tinker=={version}"], check=True, env=env)
        subprocess.run([*pip, f"tinker=={version}"], check=True, env=env)
        found = subprocess.run([str(py), "-c", "import tinker; print(tinker.__version__)"],
                               check=True, capture_output=True, text=True, env=env).stdout.strip()
        if found != version:
            raise RuntimeError(f"{venv} imports tinker {found}, not {version}")
        (venv / ".tinkerd-stamp").write_text(_fingerprint(version) + "\n")
        log(f"[sdk-versions] built {venv} in {time.time() - started:.1f}s")
        return py


if __name__ == "__main__":
    from concurrent.futures import ThreadPoolExecutor

    # All at once: each build is mostly pip waiting on the package index.
    with ThreadPoolExecutor(len(VERSIONS)) as pool:
        for python in pool.map(ensure_venv, VERSIONS):
            print(python)
