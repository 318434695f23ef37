"""The cookbook's own virtual environment, built once and reused.

tinker-cookbook 0.6.1 cannot be installed the ordinary way here: it requires
`tml-renderers`, which the reachable package index lacks and which only Inkling / Kimi-K3
models import. So, as docs/cookbook.md §1.1 explains, we install the cookbook's other
declared dependencies, then the cookbook itself with `--no-deps`, then what `math_rl` needs.

The venv is bare (no pip of its own) and a .pth line appends the dev venv's site-packages
after its own, as the SDK version venvs do (tests/versions/sdk_venvs.py): torch,
transformers and the rest that both sides declare are shared instead of installed a second
time (about two minutes and 1.5 GB on every clean checkout), while whatever the cookbook
pins differently gets its own copy, which wins. tinkerd itself is not importable there: the
dev venv's own .pth files (its editable install) are not read through an appended path, and
the build checks it.

The environment lives at `.data/cookbook-venv` (gitignored). A stamp file records the exact
requirement list and the shared path; it is written last, so an interrupted build is redone,
and a changed list rebuilds. Run `python tests/acceptance/cookbook_env.py` to build it by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import site
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


def _shared_site_packages() -> str:
    return next(p for p in site.getsitepackages() if p.endswith("site-packages"))


def _fingerprint() -> str:
    key = {"python": sys.version_info[:2], "steps": STEPS, "shared": _shared_site_packages()}
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


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
        # The base interpreter, not the dev venv's, so only the .pth below links the two.
        base_python = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True)
        py = str(venv_python(venv))
        own = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
        Path(own, "tinkerd-shared.pth").write_text(_shared_site_packages() + "\n")
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("PYTHONPATH", None)
        # The dev venv's pip, pointed at this interpreter: it resolves over the combined path.
        pip = [sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-warn-conflicts"]
        for step in STEPS:
            log(f"[cookbook-venv] pip install {' '.join(step)}")
            subprocess.run([*pip, *step], check=True, env=env)
        # Importing the recipes is the real check that the partial install is complete; and
        # the recipes must see the SDK only, never tinkerd.
        subprocess.run(
            [py, "-c", "import tinker_cookbook.recipes.chat_sl.train, tinker_cookbook.recipes.math_rl.train\n"
                       "import importlib.util\n"
                       "assert importlib.util.find_spec('tinkerd') is None, 'tinkerd is importable in the cookbook venv'"],
            check=True, env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
        (venv / ".tinkerd-stamp").write_text(_fingerprint() + "\n")
        log(f"[cookbook-venv] built {venv} in {time.time() - started:.0f}s")
        return venv_python(venv)


if __name__ == "__main__":
    print(ensure_cookbook_venv())
