"""LoRA adapters on disk in PEFT layout (adapter_config.json + adapter_model.safetensors):
the one reader and writer of them, for checkpoints and for adapters made elsewhere.

`peft.PeftModel.from_pretrained(base, dir)` and vLLM load these directories as they are.
Optimizer state, when saved, sits beside them in `optimizer.safetensors`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tinkerd.atomic_dir import replaced_atomically
from tinkerd.engine.model import LoraWeights
from tinkerd.types import UserError

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TINKERD_FILE = "tinkerd.json"  # our own settings (LoRA flags, seed): kept out of adapter_config.json so PEFT loads it without warnings


class CheckpointFileError(UserError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


# PEFT's tensor names; an adapter saved by PEFT under a name other than the default keeps
# that name between lora_A/B and .weight.
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<which>A|B)(?:\.[A-Za-z0-9_]+)?\.weight$")


def peft_key(path: str, which: str) -> str:
    return f"base_model.model.{path}.lora_{which}.weight"


def adapter_tensors(weights: LoraWeights) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in weights.a:
        tensors[peft_key(path, "A")] = weights.a[path].detach().float().cpu().contiguous()
        tensors[peft_key(path, "B")] = weights.b[path].detach().float().cpu().contiguous()
    return tensors


def peft_config(rank: int, alpha: float, paths: list[str], base_model: str) -> dict:
    targets = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": targets,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def write_checkpoint_dir(
    target: Path,
    weights: LoraWeights,
    rank: int,
    alpha: float,
    base_model: str,
    extra_config: dict | None = None,
    optimizer_tensors: dict[str, torch.Tensor] | None = None,
    optimizer_meta: dict[str, str] | None = None,
) -> int:
    """Write atomically: into a sibling temp dir, fsync, then rename. Returns total bytes."""
    with replaced_atomically(target, fsync=True) as tmp:
        config = peft_config(rank, alpha, list(weights.a), base_model)
        save_file(adapter_tensors(weights), str(tmp / ADAPTER_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (tmp / TINKERD_FILE).write_text(json.dumps(extra_config or {}, indent=2))
        if optimizer_tensors is not None:
            save_file(optimizer_tensors, str(tmp / OPTIMIZER_FILE), metadata=optimizer_meta or {})
    return sum(f.stat().st_size for f in target.iterdir())


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json, with our settings (tinkerd.json, if present) under the key "tinkerd"."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        if (directory / TINKERD_FILE).exists():
            config["tinkerd"] = json.loads((directory / TINKERD_FILE).read_text())
        return config
    except (OSError, ValueError) as exc:
        raise CheckpointFileError(f"checkpoint {directory.name}: cannot read {CONFIG_FILE} ({exc})") from exc


def _plain_lora_problems(config: dict) -> list[str]:
    """PEFT settings tinkerd's LoRA does not have (it would compute something else)."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return [f"peft_type {config.get('peft_type')} (only LoRA)"]
    return [
        what for what, bad in (
            ("use_dora", config.get("use_dora")),
            ("rank_pattern", config.get("rank_pattern")),
            ("alpha_pattern", config.get("alpha_pattern")),
            ("modules_to_save", config.get("modules_to_save")),
            ("bias", config.get("bias", "none") not in (None, "none")),
        ) if bad
    ]


def read_checkpoint_dir(directory: Path, device: torch.device) -> tuple[dict, LoraWeights]:
    """(adapter_config, weights) of a PEFT LoRA directory: a tinkerd checkpoint or an adapter
    trained elsewhere (safetensors or PEFT's older adapter_model.bin). Raises
    CheckpointFileError naming what is wrong."""
    config = read_adapter_config(directory)
    problems = _plain_lora_problems(config)
    if problems:
        raise CheckpointFileError(f"checkpoint {directory.name}: adapter settings that tinkerd's LoRA does not have: {', '.join(problems)}")
    try:
        if (directory / ADAPTER_FILE).is_file() or not (directory / "adapter_model.bin").is_file():
            tensors = load_file(str(directory / ADAPTER_FILE))
        else:
            tensors = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointFileError(f"checkpoint {directory.name}: cannot read {ADAPTER_FILE} ({exc})") from exc
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise CheckpointFileError(
                f"checkpoint {directory.name}: unsupported tensor {key!r}: only lora_A / lora_B weights of linear layers")
        (a if match["which"] == "A" else b)[match["path"]] = tensor.detach().float().contiguous().to(device)
    if set(a) != set(b) or not a:
        raise CheckpointFileError(f"checkpoint {directory.name}: incomplete LoRA tensors (every module needs lora_A and lora_B)")
    rank = int(config.get("r") or next(iter(a.values())).shape[0])
    alpha = float(config.get("lora_alpha", rank))
    # rsLoRA scales by alpha/sqrt(r) where plain LoRA scales by alpha/r.
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return config, LoraWeights(a=a, b=b, scale=scale)


def read_optimizer(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    f = directory / OPTIMIZER_FILE
    if not f.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:
        raise CheckpointFileError(f"checkpoint {directory.name}: cannot read {OPTIMIZER_FILE} ({exc})") from exc
    return tensors, meta
