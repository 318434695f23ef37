"""Adapters in and out of tinkerd, without a running server.

* `export_merged`: a checkpoint (tinker:// path in a data dir, or a PEFT directory) merged
  into its base model, written as a plain Hugging Face model directory that
  `transformers.AutoModelForCausalLM.from_pretrained` loads as it is.
* `import_adapter`: a PEFT LoRA directory made for a model tinkerd serves becomes a
  training checkpoint (`tinker://import-…:train:0/weights/<name>`) that can be sampled
  by path and trained further with `create_training_client_from_state`.

Both read and write the same database (the data dir's SQLite file, or `--database-url`) and
checkpoint tree as `tinkerd serve`, so they work while the server runs.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from tinkerd.atomic_dir import replaced_atomically
from tinkerd.core.access import LOCAL, SYSTEM
from tinkerd.core.db import DATABASE_FILE, CheckpointRow, RunRow, SessionRow, open_database
from tinkerd.core.paths import TinkerPath, check_checkpoint_name
from tinkerd.core.registry import Registry
from tinkerd.engine.model import ATTN_MODULES, MLP_MODULES, LoraWeights, ModelConfig, init_lora, lora_module_paths
from tinkerd.engine.peft_io import read_checkpoint_dir, write_checkpoint_dir
from tinkerd.model_store import ModelSource, resolve_model
from tinkerd.types import UserError

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)


class AdapterError(UserError):
    """The command cannot do what was asked; the message says why."""


@dataclass
class Checkpoint:
    directory: Path
    base_model: str | None  # the served base model name, when known
    label: str  # what to call it in messages


def _database(data_dir: Path, database_url: str | None):
    """The server's database: `database_url`, or else the SQLite file in `data_dir`."""
    if database_url is not None:
        return open_database(database_url)
    db_file = data_dir / DATABASE_FILE
    if not db_file.exists():
        raise AdapterError(f"{data_dir} is not a tinkerd data dir (no {DATABASE_FILE}); pass --data-dir (and --database-url "
                           "if the server keeps its metadata elsewhere)")
    return open_database(db_file)


def find_checkpoint(checkpoint: str, data_dir: Path, database_url: str | None = None) -> Checkpoint:
    """A tinker:// path looked up in `data_dir` (its metadata in `database_url`, if given), or a local PEFT directory."""
    if checkpoint.startswith("tinker://"):
        registry = Registry(_database(data_dir, database_url), data_dir)
        try:
            path = TinkerPath.parse(checkpoint)
            row = registry.checkpoint(path, SYSTEM)  # offline: whoever can read the data dir can read every checkpoint
            base_model = registry.run_row(row.run_id, SYSTEM).base_model
        except UserError as exc:
            raise AdapterError(f"{exc} (in {data_dir})") from None
        return Checkpoint(Path(row.directory), base_model, checkpoint)
    directory = Path(checkpoint).expanduser()
    if not (directory / "adapter_config.json").is_file():
        raise AdapterError(f"{checkpoint} is neither a tinker:// path nor a directory with adapter_config.json")
    config = json.loads((directory / "adapter_config.json").read_text())
    return Checkpoint(directory, config.get("base_model_name_or_path"), str(directory))


def _base_model(model: str | None, fallback: str | None, data_dir: Path) -> ModelSource:
    name = model or fallback
    if not name:
        raise AdapterError("cannot tell which base model this adapter is for: pass --model (a served model name or HF directory)")
    try:
        return resolve_model(name, data_dir)
    except ValueError as exc:
        raise AdapterError(f"cannot load base model {name!r}: {exc}") from None


# -- export merged -------------------------------------------------------------------------


def export_merged(
    checkpoint: str, out_dir: Path, data_dir: Path, model: str | None = None, dtype: str = "float32", force: bool = False,
    database_url: str | None = None,
) -> Path:
    """Write base model + adapter (W += alpha/r · B·A) as a Hugging Face model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: import lazily

    if dtype not in ("float32", "bfloat16", "float16"):
        raise AdapterError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise AdapterError(f"{out_dir} exists and is not empty (pass --force to replace it)")
    ckpt = find_checkpoint(checkpoint, data_dir, database_url)
    base = _base_model(model, ckpt.base_model, data_dir)
    try:
        _, lora = read_checkpoint_dir(ckpt.directory, torch.device("cpu"))
    except ValueError as exc:
        raise AdapterError(str(exc)) from None

    try:
        merged = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
    except (OSError, ValueError) as exc:  # no weights there, an unknown architecture, ...
        raise AdapterError(f"cannot load base model {base.name} from {base.path}: {exc} (pass --model NAME=DIR)") from None
    embeddings = merged.get_input_embeddings().weight
    output = merged.get_output_embeddings()
    if "lm_head" in lora.a and output is not None and output.weight.data_ptr() == embeddings.data_ptr():
        # Tied input/output embeddings: merging into lm_head must not change the input
        # embeddings, so give lm_head its own copy and record that the model is untied.
        output.weight = torch.nn.Parameter(output.weight.detach().clone())
        merged.config.tie_word_embeddings = False
        if hasattr(merged.config, "get_text_config"):
            merged.config.get_text_config().tie_word_embeddings = False
    with torch.no_grad():
        for path in lora.a:
            weight = _projection_weight(merged, path, base.name)
            delta = lora.scale * (lora.b[path].float() @ lora.a[path].float())
            if delta.shape != weight.shape:
                raise AdapterError(f"adapter shape {tuple(delta.shape)} does not fit {path} {tuple(weight.shape)} of {base.name}")
            weight += delta
    merged.to(getattr(torch, dtype))
    merged.config._name_or_path = f"{base.name} + {ckpt.label}"

    with replaced_atomically(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(base.path)).save_pretrained(str(tmp))
        for name in _TOKENIZER_FILES:  # keep e.g. the chat template file exactly as the base has it
            if (base.path / name).exists() and not (tmp / name).exists():
                shutil.copyfile(base.path / name, tmp / name)
        (tmp / "tinkerd_export.json").write_text(json.dumps({"base_model": base.name, "adapter": ckpt.label}, indent=2))
    return out_dir


def _projection_weight(model: torch.nn.Module, path: str, base_name: str) -> torch.Tensor:
    """The weight [out, in] of the projection at PEFT module path `path` in a transformers
    model, as a view to add a LoRA update into. A MoE expert's projection
    (`model.layers.3.mlp.experts.7.up_proj`) is a slice of the experts' stacked weights in
    transformers 5 (`experts.gate_up_proj` [experts, 2 · inter, hidden], gate first, and
    `experts.down_proj`), and a module of its own in earlier versions."""
    parent, _, name = path.rpartition(".")
    experts, _, index = parent.rpartition(".")
    try:
        if experts.endswith(".mlp.experts") and index.isdigit():
            stacked = model.get_submodule(experts)
            if isinstance(getattr(stacked, "gate_up_proj", None), torch.Tensor):
                expert = int(index)
                if name == "down_proj":
                    return stacked.down_proj[expert]
                gate_up = stacked.gate_up_proj[expert]
                half = gate_up.shape[0] // 2
                return gate_up[:half] if name == "gate_proj" else gate_up[half:]
        return model.get_submodule(path).weight
    except (AttributeError, IndexError):
        raise AdapterError(f"the adapter targets {path}, which {base_name} does not have") from None


# -- import adapter ------------------------------------------------------------------------


def import_adapter(peft_dir: Path, data_dir: Path, model: str | None = None, name: str | None = None,
                   owner: str = LOCAL, database_url: str | None = None) -> str:
    """Copy a PEFT LoRA into the data dir as a training checkpoint of user `owner`; returns its tinker:// path."""
    peft_dir = peft_dir.expanduser()
    if not (peft_dir / "adapter_config.json").is_file():
        raise AdapterError(f"{peft_dir} has no adapter_config.json: not a PEFT adapter directory")
    db = _database(data_dir, database_url)
    try:
        config_file = json.loads((peft_dir / "adapter_config.json").read_text())
    except ValueError:
        config_file = None  # read_checkpoint_dir names what is wrong with it
    fallback = config_file.get("base_model_name_or_path") if isinstance(config_file, dict) else None
    base = _base_model(model, fallback, data_dir)
    metadata = {"imported_from": str(peft_dir.resolve())}
    return import_peft_dir(peft_dir, db, data_dir, base, owner, kind="weights", name=name or "imported",
                           session_prefix="import", tags=["import-adapter"], metadata=metadata)


def import_peft_dir(peft_dir: Path, db, data_dir: Path, base: ModelSource, owner: str, *, kind: str, name: str,
                    session_prefix: str, tags: list[str], metadata: dict, project_id: str | None = None,
                    rank: int | None = None) -> str:
    """A PEFT LoRA directory for `base` written as checkpoint `kind`/`name` of a new finished
    session and run of `owner` (in `project_id`); returns its tinker:// path. With `rank`, the
    adapter must have that rank. Used by `tinkerd import-adapter` and the weights upload."""
    try:
        config, lora = read_checkpoint_dir(peft_dir, torch.device("cpu"))
    except UserError as exc:
        raise AdapterError(str(exc)) from None
    a, b = lora.a, lora.b
    if not a:
        raise AdapterError("the adapter holds no LoRA weights")
    cfg = ModelConfig.from_hf(json.loads((base.path / "config.json").read_text()))
    known = set(lora_module_paths(cfg, True, True, True))
    adapter_rank = int(config.get("r") or next(iter(a.values())).shape[0])
    if rank is not None and adapter_rank != rank:
        raise AdapterError(f"the adapter has rank r={adapter_rank}, but lora_config.rank is {rank}")
    rank = adapter_rank
    for path in sorted(a):
        if path not in known:
            raise AdapterError(f"the adapter targets {path}, which tinkerd cannot train on {base.name} (known: attention, MLP, lm_head)")
        in_features, out_features = cfg.lora_shape(path)
        if tuple(a[path].shape) != (rank, in_features) or tuple(b[path].shape) != (out_features, rank):
            raise AdapterError(
                f"{path}: lora_A {tuple(a[path].shape)} / lora_B {tuple(b[path].shape)} do not fit {base.name} "
                f"with r={rank} (expected {(rank, in_features)} / {(out_features, rank)}): is this adapter for another model?"
            )
    alpha = lora.scale * rank  # tinkerd's LoRA scales by alpha/r (an rsLoRA adapter's alpha/sqrt(r) becomes this)
    train_attn = any(p.rsplit(".", 1)[-1] in ATTN_MODULES for p in a)
    train_mlp = any(p.rsplit(".", 1)[-1] in MLP_MODULES for p in a)
    train_unembed = "lm_head" in a
    # tinkerd trains whole groups (attention / MLP / lm_head). Modules of a group the adapter
    # leaves out get the usual fresh LoRA (random A, zero B): the outputs are unchanged and
    # further training can still move them.
    seed = int(uuid.uuid4().int % 2**31)
    fresh = init_lora(cfg, lora_module_paths(cfg, train_attn, train_mlp, train_unembed), rank, alpha, seed, torch.device("cpu"))
    weights = LoraWeights(a={**fresh.a, **a}, b={**fresh.b, **b}, scale=alpha / rank)

    try:
        check_checkpoint_name(name)
    except UserError as exc:
        raise AdapterError(str(exc)) from None
    session_id = f"{session_prefix}-{uuid.uuid4().hex[:16]}"
    run_id = f"{session_id}:train:0"
    path = TinkerPath(run_id, kind, name)
    directory = data_dir / "checkpoints" / run_id / kind / f"{name}@{uuid.uuid4().hex[:8]}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    extra = {"train_attn": train_attn, "train_mlp": train_mlp, "train_unembed": train_unembed, "seed": seed, **metadata}
    size = write_checkpoint_dir(directory, weights, rank, alpha, base.name, extra)
    with db.begin() as s:  # files first, rows last: the checkpoint exists once this commits
        s.add(SessionRow(id=session_id, status="finished", tags=tags, user_metadata=metadata, owner=owner, project_id=project_id))
        s.add(RunRow(id=run_id, session_id=session_id, owner=owner, base_model=base.name, lora_rank=rank, train_attn=train_attn,
                     train_mlp=train_mlp, train_unembed=train_unembed, seed=seed, user_metadata=metadata, project_id=project_id))
        s.add(CheckpointRow(run_id=run_id, kind=kind, name=name, directory=str(directory), size_bytes=size,
                            user_metadata=metadata, has_optimizer=False))
    return str(path)
