"""Model sources: `NAME=DIR` and plain directories, and which HF cache entries tinkerd may seed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tinkerd.model_store import ModelNotFoundError, ModelSource, record_served, resolve_model, seed_hf_cache

NAME = "myorg/seeded"


def model_dir_at(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return path


def test_name_equals_dir_serves_the_directory_under_the_name(tmp_path):
    directory = model_dir_at(tmp_path / "weights")
    assert resolve_model(f"Qwen/Qwen3-8B={directory}", tmp_path) == ModelSource("Qwen/Qwen3-8B", directory.resolve())


def test_a_name_served_from_a_directory_resolves_to_it_later_in_the_same_data_dir(tmp_path):
    """Offline commands (`export merged`, `import-adapter`) given only the name a checkpoint
    records find the directory the server loaded it from."""
    served_name = "tinkerd-tests/served-from-a-directory"  # never seeded in any HF cache
    data_dir = tmp_path / "data"
    first, second = model_dir_at(tmp_path / "first"), model_dir_at(tmp_path / "second")
    record_served(resolve_model(f"{served_name}={first}", data_dir), data_dir)
    assert resolve_model(served_name, data_dir) == ModelSource(served_name, first.resolve())
    record_served(resolve_model(f"{served_name}={second}", data_dir), data_dir)  # served again from elsewhere
    assert resolve_model(served_name, data_dir) == ModelSource(served_name, second.resolve())
    with pytest.raises(ModelNotFoundError):  # another data dir knows nothing of it (and the hub is offline)
        resolve_model(served_name, tmp_path / "other")


def test_a_plain_directory_keeps_its_path_as_name_even_with_an_equals_sign(tmp_path):
    directory = model_dir_at(tmp_path / "run=3")
    assert resolve_model(str(directory), tmp_path) == ModelSource(str(directory.resolve()), directory.resolve())


def test_name_equals_dir_refuses_what_is_not_a_model_directory(tmp_path):
    missing = tmp_path / "nonexistent"
    with pytest.raises(ModelNotFoundError, match=f"'org/m'.*{re.escape(str(missing))}.*not a directory"):
        resolve_model(f"org/m={missing}", tmp_path)
    (tmp_path / "bare").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(f"org/m={tmp_path / 'bare'}", tmp_path)
    with pytest.raises(ModelNotFoundError, match="name before '=' is empty"):
        resolve_model(f"={model_dir_at(tmp_path / 'ok')}", tmp_path)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def tokenizer_dir(model_dir: Path, target: Path, chat_template: str | None) -> Path:
    """The default model's tokenizer, with its own chat template (or none) to tell copies apart."""
    model_dir_at(target)
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(model_dir / fname, target / fname)
    if chat_template is not None:
        (target / "chat_template.jinja").write_text(chat_template)
    return target


def snapshot_files(hub_cache: Path, name: str) -> dict[str, bytes]:
    repo = hub_cache / ("models--" + name.replace("/", "--"))
    snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text()
    return {p.name: p.read_bytes() for p in snapshot.iterdir()}


def test_a_seeded_name_loads_its_tokenizer_offline(model_dir, hub_cache, tmp_path):
    from transformers import AutoTokenizer

    source = tokenizer_dir(model_dir, tmp_path / "a", "{{ 'A' }}")
    seed_hf_cache(ModelSource(NAME, source))
    tok = AutoTokenizer.from_pretrained(NAME, cache_dir=str(hub_cache))
    assert tok.encode("hello world") == AutoTokenizer.from_pretrained(str(model_dir)).encode("hello world")
    assert tok.chat_template == "{{ 'A' }}"


def test_an_entry_tinkerd_seeded_follows_the_directory_now_served(model_dir, hub_cache, tmp_path):
    seed_hf_cache(ModelSource(NAME, tokenizer_dir(model_dir, tmp_path / "a", "{{ 'A' }}")))
    later = tokenizer_dir(model_dir, tmp_path / "b", None)  # another directory, no chat template
    seed_hf_cache(ModelSource(NAME, later))
    assert snapshot_files(hub_cache, NAME) == {p.name: p.read_bytes() for p in later.iterdir()}
    assert not [p for p in (hub_cache / ("models--" + NAME.replace("/", "--")) / "snapshots").iterdir()
                if p.name.endswith((".partial", ".stale"))]


def test_a_hub_download_is_never_overwritten(model_dir, hub_cache, tmp_path):
    repo = hub_cache / ("models--" + NAME.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "tokenizer_config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    seed_hf_cache(ModelSource(NAME, tokenizer_dir(model_dir, tmp_path / "a", "{{ 'A' }}")))
    assert (repo / "refs" / "main").read_text() == commit
    assert snapshot_files(hub_cache, NAME) == {"tokenizer_config.json": b"{}"}
    assert [p.name for p in (repo / "snapshots").iterdir()] == [commit]


def test_a_path_standing_in_for_a_name_is_not_seeded(model_dir, hub_cache, tmp_path):
    source = tokenizer_dir(model_dir, tmp_path / "a", None)
    seed_hf_cache(ModelSource(str(source), source))
    assert not hub_cache.exists()
