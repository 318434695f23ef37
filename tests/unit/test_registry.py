"""Registry pieces that need no server: signed URLs, file integrity checks, orphan sweep, and
the queries behind the REST listings, on SQLite and on Postgres."""

from __future__ import annotations

import datetime as dt
import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tinkerd.core.access import LOCAL_USER
from tinkerd.core.db import CheckpointRow, RunRow, open_database, utcnow
from tinkerd.core.paths import TinkerPath
from tinkerd.core.registry import Forbidden, Registry, check_checkpoint_files, disk_full_message
from tinkerd.types import NotFound, UserError

RUN = "sess-x:train:0"


def write_checkpoint(directory: Path, with_optimizer: bool = False) -> None:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 32}))
    save_file({"a": torch.ones(2, 3)}, str(directory / "adapter_model.safetensors"))
    if with_optimizer:
        save_file({"m": torch.zeros(4)}, str(directory / "optimizer.safetensors"))


@pytest.fixture
def registry(database_url: str, tmp_path: Path):
    db = open_database(database_url)
    directory = tmp_path / "checkpoints" / RUN / "external_weights" / "ext@1"
    write_checkpoint(directory)
    with db.begin() as s:
        s.add(RunRow(id=RUN, session_id="sess-x", base_model="m", lora_rank=2))
        s.add(CheckpointRow(run_id=RUN, kind="external_weights", name="ext", directory=str(directory)))
    yield Registry(db, tmp_path)
    db.kw["bind"].dispose()


def token_of(url: str) -> str:
    return url.split("token=", 1)[1]


def test_signed_urls_open_their_file_until_they_expire(registry: Registry, tmp_path: Path):
    now = utcnow()
    urls, expires = registry.download_urls(TinkerPath.parse(f"tinker://{RUN}/external_weights/ext"), "http://h/dl", LOCAL_USER, now=now)
    assert set(urls) == {"adapter_config.json", "adapter_model.safetensors"} and expires.tzinfo is not None
    token = token_of(urls["adapter_config.json"])
    assert registry.open_download(token, now=now).name == "adapter_config.json"
    with pytest.raises(Forbidden, match="expired"):
        registry.open_download(token, now=expires + dt.timedelta(seconds=1))
    payload, signature = token.split(".")
    with pytest.raises(Forbidden):
        registry.open_download(payload + "." + signature[::-1], now=now)
    # another data dir has another secret
    other = Registry(registry.db, tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(Forbidden):
        other.open_download(token, now=now)
    # the key persists: a restarted server still honours its URLs
    assert Registry(registry.db, tmp_path).open_download(token, now=now).is_file()


def test_urls_of_a_deleted_checkpoint_stop_working(registry: Registry):
    path = TinkerPath.parse(f"tinker://{RUN}/external_weights/ext")
    urls, _ = registry.download_urls(path, "http://h/dl", LOCAL_USER)
    registry.delete_checkpoint(path, LOCAL_USER)
    with pytest.raises(NotFound):
        registry.open_download(token_of(urls["adapter_model.safetensors"]))


def test_only_external_weights_get_urls(registry: Registry):
    with pytest.raises(UserError, match="save_weights_external"):
        registry.download_urls(TinkerPath.parse(f"tinker://{RUN}/weights/ext"), "http://h/dl", LOCAL_USER)


def test_check_checkpoint_files(tmp_path: Path):
    good = tmp_path / "good"
    write_checkpoint(good, with_optimizer=True)
    check_checkpoint_files(good, "tinker://r/weights/good", with_optimizer=True)

    truncated = tmp_path / "truncated"
    write_checkpoint(truncated)
    blob = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(blob[:-4])
    with pytest.raises(UserError, match="tinker://r/weights/truncated is damaged"):
        check_checkpoint_files(truncated, "tinker://r/weights/truncated")

    no_optimizer = tmp_path / "no-opt"
    write_checkpoint(no_optimizer)
    check_checkpoint_files(no_optimizer, "p")
    with pytest.raises(NotFound, match="optimizer.safetensors"):
        check_checkpoint_files(no_optimizer, "p", with_optimizer=True)
    with pytest.raises(NotFound):
        check_checkpoint_files(tmp_path / "gone", "p")


def test_disk_full_message():
    assert "disk space" in disk_full_message(OSError(errno.ENOSPC, "No space left on device"))
    assert "disk space" in disk_full_message(RuntimeError('IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'))
    assert disk_full_message(OSError(errno.EACCES, "Permission denied")) is None


def test_orphan_sweep_keeps_exactly_the_listed_checkpoints(registry: Registry, tmp_path: Path):
    kind_dir = tmp_path / "checkpoints" / RUN / "external_weights"
    write_checkpoint(kind_dir / "ext@2")  # written, never committed
    (tmp_path / "ephemeral" / "sess-x:sample:0").mkdir(parents=True)
    removed = registry.remove_orphan_files()
    assert [p.name for p in removed] == ["ext@2"]
    assert (kind_dir / "ext@1").is_dir() and not (tmp_path / "ephemeral").exists()


def test_ttl_bounds(registry: Registry):
    path = TinkerPath.parse(f"tinker://{RUN}/external_weights/ext")
    assert registry.set_ttl(path, 60, LOCAL_USER) > utcnow()
    assert registry.set_ttl(path, None, LOCAL_USER) is None
    for bad in (0, -1, 11 * 365 * 24 * 3600, "60", True):
        with pytest.raises(UserError):
            registry.set_ttl(path, bad, LOCAL_USER)


def test_listings_and_access_on_each_database(registry: Registry, tmp_path: Path):
    """The queries behind the REST listings and the console give the same answers on SQLite
    and Postgres: search, counts, who sees what, progress, aware timestamps."""
    from tinkerd.core.access import User
    from tinkerd.core.db import MetricRow
    from tinkerd.core.registry import iso

    alice, bob = User("alice"), User("bob")
    with registry.db.begin() as s:
        s.add(RunRow(id="sess-a:train:0", session_id="sess-a", base_model="Org/Model-A", lora_rank=4, owner="alice",
                     user_metadata={"note": "ünïcode"}))
        s.add(RunRow(id="sess-b:train:0", session_id="sess-b", base_model="Org/Model-B", lora_rank=4, owner="bob"))
        s.add(CheckpointRow(run_id="sess-b:train:0", kind="weights", name="shared", directory=str(tmp_path / "b1"), public=True))
        s.add(CheckpointRow(run_id="sess-b:train:0", kind="weights", name="private", directory=str(tmp_path / "b2")))
        for seq_id, kind, key, value in [(1, "forward_backward", "loss:sum", 2.5), (2, "optim_step", "lr", 1e-4),
                                         (3, "forward_backward", "loss:sum", 1.5), (4, "optim_step", "lr", 1e-4)]:
            s.add(MetricRow(run_id="sess-a:train:0", seq_id=seq_id, kind=kind, key=key, value=value))

    runs, total = registry.list_runs(alice, limit=10, offset=0, search="MODEL-a")  # case-insensitive everywhere
    assert total == 1 and [r.run.id for r in runs] == ["sess-a:train:0"] and runs[0].run.user_metadata == {"note": "ünïcode"}
    assert registry.list_runs(alice, limit=10, offset=0, search="50%")[1] == 0  # % is a character, not a wildcard
    # bob's run is visible to alice only through its published checkpoint
    runs, total = registry.list_runs(alice, limit=10, offset=0, access_scope="accessible")
    assert total == 2
    b = next(r for r in runs if r.run.owner == "bob")
    assert b.last_checkpoint is not None and b.last_checkpoint.name == "shared"
    assert [c.name for c in registry.list_checkpoints(alice, run_id="sess-b:train:0")[0]] == ["shared"]
    assert sorted(c.name for c in registry.list_checkpoints(bob)[0]) == ["private", "shared"]
    assert registry.run_progress(["sess-a:train:0", "sess-b:train:0"]) == {"sess-a:train:0": (2, 1.5), "sess-b:train:0": (0, None)}
    assert [m.seq_id for m in registry.metric_history("sess-a:train:0", alice, after_id=0)] == [1, 2, 3, 4]
    stamp = iso(registry.run_row("sess-a:train:0", alice).created_at)
    assert stamp.endswith("+00:00") and abs(dt.datetime.fromisoformat(stamp) - utcnow()) < dt.timedelta(minutes=5)


def test_a_nul_character_is_the_clients_mistake_on_every_database(registry: Registry):
    """Postgres text cannot hold NUL: a name or search with one is a 4xx there too, never a 500."""
    with pytest.raises(UserError):
        registry.run_row("sess-x\x00:train:0", LOCAL_USER)  # NotFound on SQLite, refused as bad input on Postgres
    if registry.db.kw["bind"].dialect.name == "postgresql":
        with pytest.raises(UserError, match="NUL"):
            registry.list_runs(LOCAL_USER, limit=10, offset=0, search="a\x00b")
    else:
        assert registry.list_runs(LOCAL_USER, limit=10, offset=0, search="a\x00b")[1] == 0
