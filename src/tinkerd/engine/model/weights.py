"""A Hugging Face model directory's safetensors weights, streamed onto the engine's device.

Shards are memory-mapped and read one tensor at a time, each converted to the target
device and dtype before the next is read. The host therefore never holds the checkpoint
twice: a 16 GB bf16 checkpoint loaded onto a GPU needs one tensor's worth of host memory
(plus page cache the kernel can reclaim), not 32 GB.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from tinkerd.engine.model.config import UnsupportedModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the model's weights, in load order.

    `model.safetensors` if present; else the shards named by `model.safetensors.index.json`
    (all of them must exist); else every `*.safetensors` in the directory, sorted.
    """
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UnsupportedModelError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (model_dir / name).is_file()]
        if missing:
            raise UnsupportedModelError(
                f"{model_dir} is incomplete: {INDEX_FILE} lists {len(names)} shards, "
                f"{len(missing)} missing ({', '.join(missing)})"
            )
        return [model_dir / name for name in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"no .safetensors weights in {model_dir}")
    return files


def _data_bytes(shard: Path) -> int:
    """Bytes of tensor data in a shard: the file less its 8-byte length prefix and JSON header."""
    with shard.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return shard.stat().st_size - 8 - header_len


def load_weights(
    model_dir: Path, device: torch.device, dtype: torch.dtype, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Every tensor of the model's safetensors weights, by its name on disk, on `device`.

    Floating-point tensors are converted to `dtype`; integer and bool tensors keep theirs.
    The progress bar (bytes read) shows only on a terminal, and never with `progress=False`.
    """
    shards = shard_files(model_dir)
    weights: dict[str, torch.Tensor] = {}
    total = sum(_data_bytes(shard) for shard in shards)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {model_dir.name}",
              disable=None if progress else True) as bar:
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    bar.update(tensor.nbytes)
                    target = dtype if tensor.is_floating_point() else tensor.dtype
                    weights[name] = tensor.to(device=device, dtype=target)
                    del tensor  # the host copy goes before the next tensor is read
    return weights
