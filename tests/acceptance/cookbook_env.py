"""The cookbook's own virtual environment, built once and reused.

tinker-cookbook 0.6.1 cannot be installed the ordinary way here: it requires
`tml-renderers`, which the reachable package index lacks and which only Inkling / Kimi-K3
models import. So, as docs/cookbook.md §1.1 explains, we install a CPU torch first (pip
takes it from the local wheel directory), then the cookbook's other declared dependencies,
then the cookbook itself with `--no-deps`, then what `math_rl` needs.

The environment lives at `.data/cookbook-venv` (gitignored). A stamp file records the exact
requirement list; it is written last, so an interrupted build is redone, and a changed list
rebuilds. Run `python tests/acceptance/cookbook_env.py` to build it by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("TINKERD_COOKBOOK_VENV", REPO / ".data" / "cookbook-venv"))

COOKBOOK = "tinker-cookbook==0.6.1"
# Never a bare `torch`: the resolver would pull a multi-GB CUDA build from the index.
TORCH = "torch==2.13.0"
# tinker-cookbook 0.6.1's Requires-Dist, less tml-renderers and torch (installed above);
# tinker held to the minor version tinkerd speaks.
COOKBOOK_DEPS = [
    "aiohttp>=3.9.0", "anyio>=4.0.0", "blobfile>=3.0.0", "chz>=0.4.0", "cloudpickle>=3.0.0",
    "datasets>=2.14.0", "huggingface-hub>=0.20.0", "numpy>=1.24.0", "pillow>=10.0.0",
    "pydantic>=2.0.0", "pyrage>=1.4.0", "rich>=13.0.0", "safetensors>=0.4.0", "termcolor>=2.0.0",
    "tiktoken>=0.12.0", "tinker>=0.38.0,<0.39", "tqdm>=4.60.0",
    "transformers!=5.3.0,!=5.4.*,!=5.5.0,!=5.5.1,!=5.5.2,!=5.5.3,!=5.6.*,>=4.57.6",
]
MATH_RL_DEPS = ["math-verify>=0.5.0", "pylatexenc>=2.0", "sympy>=1.12.0"]
STEPS = [[TORCH], COOKBOOK_DEPS, ["--no-deps", COOKBOOK], MATH_RL_DEPS]


def _fingerprint() -> str:
    return hashlib.sha256(json.dumps({"python": sys.version_info[:2], "steps": STEPS}).encode()).hexdigest()[:16]


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def is_ready(venv: Path = VENV) -> bool:
    stamp = venv / ".tinkerd-stamp"
    return stamp.exists() and stamp.read_text().strip() == _fingerprint() and venv_python(venv).exists()


def ensure_cookbook_venv(venv: Path = VENV, log=print) -> Path:
    """Build (or reuse) the cookbook venv and return its python. Safe to call concurrently."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / ".cookbook-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(venv):
            return venv_python(venv)
        started = time.time()
        if venv.exists():
            shutil.rmtree(venv)
        # The base interpreter, not the dev venv's, so nothing of tinkerd leaks in.
        base_python = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
        py = str(venv_python(venv))
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("PYTHONPATH", None)
        for step in STEPS:
            log(f"[cookbook-venv] pip install {' '.join(step)}")
            subprocess.run([py, "-m", "pip", "install", "-q", *step], check=True, env=env)
        # Importing the recipes is the real check that the partial install is complete.
        subprocess.run(
            [py, "-c", "import tinker_cookbook.recipes.chat_sl.train, tinker_cookbook.recipes.math_rl.train"],
            check=True, env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
        (venv / ".tinkerd-stamp").write_text(_fingerprint() + "\n")
        log(f"[cookbook-venv] built {venv} in {time.time() - started:.0f}s")
        return venv_python(venv)


if __name__ == "__main__":
    print(ensure_cookbook_venv())
