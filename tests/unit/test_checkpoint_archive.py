"""The one-tar checkpoint download of SDK 0.34 / 0.35: its signed URL and the archive itself.
(Those clients drive it end to end in tests/versions.)"""

from __future__ import annotations

import datetime as dt
import io
import json
import tarfile
from pathlib import Path

import pytest

from tinkerd.core.access import LOCAL_USER
from tinkerd.core.checkpoint_archive import COMPLETE_MARKER, CheckpointArchive
from tinkerd.core.db import CheckpointRow, RunRow, open_database, utcnow
from tinkerd.core.paths import TinkerPath
from tinkerd.core.registry import Forbidden, Registry
from tinkerd.types import NotFound

RUN = "sess-x:train:0"
PATH = TinkerPath.parse(f"tinker://{RUN}/weights/state")


@pytest.fixture
def registry(tmp_path: Path):
    db = open_database(f"sqlite:///{tmp_path / 'tinkerd.sqlite'}")
    directory = tmp_path / "checkpoints" / RUN / "weights" / "state@1"
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 2}))
    (directory / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 5)  # not a multiple of 512
    (directory / "optimizer.safetensors").write_bytes(b"\x01" * 1024)
    (directory / ".partial").write_text("hidden files stay out")
    with db.begin() as s:
        s.add(RunRow(id=RUN, session_id="sess-x", base_model="m", lora_rank=2))
        s.add(CheckpointRow(run_id=RUN, kind="weights", name="state", directory=str(directory)))
    yield Registry(db, tmp_path)
    db.kw["bind"].dispose()


def token_of(url: str) -> str:
    return url.split("token=", 1)[1]


def test_the_archive_holds_every_file_and_the_marker_and_is_as_long_as_announced(registry: Registry):
    row = registry.open_archive(token_of(registry.archive_url(PATH, "http://h/a", LOCAL_USER)[0]))
    directory = Path(row.directory)
    archive = CheckpointArchive(directory, 1_700_000_000)
    body = b"".join(archive)
    assert len(body) == archive.size
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert tar.getnames() == ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", COMPLETE_MARKER]
        for name in tar.getnames()[:-1]:
            assert tar.extractfile(name).read() == (directory / name).read_bytes()
        assert tar.getmember(COMPLETE_MARKER).size == 0


def test_files_deleted_after_the_archive_opened_still_stream_whole(registry: Registry):
    directory = Path(registry.checkpoint(PATH, LOCAL_USER).directory)
    expected = (directory / "adapter_model.safetensors").read_bytes()
    archive = CheckpointArchive(directory, 0)
    for f in list(directory.iterdir()):
        f.unlink()
    with tarfile.open(fileobj=io.BytesIO(b"".join(archive))) as tar:
        assert tar.extractfile("adapter_model.safetensors").read() == expected


def test_archive_urls_expire_and_are_not_file_download_tokens(registry: Registry, tmp_path: Path):
    now = utcnow()
    url, expires = registry.archive_url(PATH, "http://h/a", LOCAL_USER, now=now)
    assert url.startswith("http://h/a?token=") and expires.tzinfo is not None
    token = token_of(url)
    assert registry.open_archive(token, now=now).name == "state"
    with pytest.raises(Forbidden, match="expired"):
        registry.open_archive(token, now=expires + dt.timedelta(seconds=1))
    payload, signature = token.split(".")
    with pytest.raises(Forbidden):
        registry.open_archive(payload + "." + signature[::-1], now=now)
    with pytest.raises(Forbidden):  # an archive token opens no single file, and the other way round
        registry.open_download(token, now=now)
    ext_dir = tmp_path / "checkpoints" / RUN / "sampler_weights" / "s@1"
    ext_dir.mkdir(parents=True)
    (ext_dir / "adapter_config.json").write_text("{}")
    with registry.db() as s, s.begin():
        s.add(CheckpointRow(run_id=RUN, kind="sampler_weights", name="s", directory=str(ext_dir)))
    urls, _ = registry.download_urls(TinkerPath.parse(f"tinker://{RUN}/sampler_weights/s"), "http://h/dl", LOCAL_USER)
    with pytest.raises(Forbidden):
        registry.open_archive(token_of(urls["adapter_config.json"]))


def test_a_deleted_checkpoint_has_no_archive(registry: Registry):
    token = token_of(registry.archive_url(PATH, "http://h/a", LOCAL_USER)[0])
    registry.delete_checkpoint(PATH, LOCAL_USER)
    with pytest.raises(NotFound):
        registry.open_archive(token)
    with pytest.raises(NotFound):
        registry.archive_url(PATH, "http://h/a", LOCAL_USER)


def test_only_those_who_may_read_the_checkpoint_get_an_archive_url(registry: Registry):
    from tinkerd.core.access import User

    stranger = User("mallory")
    with pytest.raises(NotFound):
        registry.archive_url(PATH, "http://h/a", stranger)
    registry.set_public(PATH, True, LOCAL_USER)
    assert registry.open_archive(token_of(registry.archive_url(PATH, "http://h/a", stranger)[0])).name == "state"
