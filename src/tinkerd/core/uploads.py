"""Weights uploads: a PEFT LoRA adapter sent in from outside becomes an external_weights checkpoint.

Three steps, as the SDK's RestClient takes them: `start` records what the upload is for
(base model, LoRA config, destination project) and hands out one signed PUT URL per
adapter file; each file is then PUT to its URL, which needs no API key (the signature,
made with the same per-data-dir key as download URLs, is the credential); `finish` checks
the files and imports them the way `tinkerd import-adapter` does, as a new finished
session and run of the uploader, and answers the checkpoint's tinker:// path.

An upload in progress is a directory under <data dir>/uploads/ holding its request and the
files received so far. It belongs to the user who started it: anyone else finishing it is
told it does not exist. Its URLs, and the upload itself, last an hour; an abandoned one is
deleted by the next `start` after that.

`finish` first claims the upload by renaming its request file: a rename is atomic, so of
two finishes at once (two threads, or two server processes on one data dir) exactly one
imports it and makes a checkpoint; the other is told the upload is already being finished
(409), or, once that one is done, that it does not exist. A claimed upload takes no more
files, and an import that fails hands the claim back, so the upload can be finished again.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tinkerd.core.access import User
from tinkerd.core.db import utcnow
from tinkerd.core.registry import Registry
from tinkerd.types import NotFound, UserError

UPLOAD_LIFETIME = dt.timedelta(hours=1)
# The files of a PEFT LoRA adapter directory, as `save_pretrained` writes them.
UPLOAD_FILES = ("adapter_config.json", "adapter_model.safetensors")
# One PUT carries one file. The adapter of a 70B-parameter model at rank 64 is about 1.7 GB
# in fp32; the limit leaves room past that while keeping a runaway client from filling the disk.
MAX_UPLOAD_FILE_BYTES = 4 << 30
MAX_CONFIG_FILE_BYTES = 1 << 20
REQUEST_FILE = "upload.json"
CLAIMED_FILE = "upload.finishing.json"  # the request file while a finish imports the upload
MAX_LORA_RANK = 512


class UploadTooLarge(UserError):
    status = 413


class UploadBeingFinished(UserError):
    status = 409


def check_lora_config(value: Any) -> dict:
    """The LoRA config of a start request, as the SDK's LoraConfig types it."""
    if not isinstance(value, dict):
        raise UserError("lora_config is required: {\"rank\": int, ...}", field="lora_config")
    rank = value.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or not (1 <= rank <= MAX_LORA_RANK):
        raise UserError(f"lora_config.rank must be an integer between 1 and {MAX_LORA_RANK}, got {rank!r}", field="rank")
    for flag in ("train_attn", "train_mlp", "train_unembed"):
        if not isinstance(value.get(flag, True), bool):
            raise UserError(f"lora_config.{flag} must be true or false", field=flag)
    unknown = sorted(set(value) - {"rank", "seed", "train_attn", "train_mlp", "train_unembed"})
    if unknown:
        raise UserError(f"lora_config has unknown field(s): {', '.join(unknown)}", field=unknown[0])
    return dict(value)


class WeightsUploads:
    def __init__(self, registry: Registry, data_dir: Path):
        self.registry = registry
        self.root = data_dir / "uploads"
        self.data_dir = data_dir

    def _dir(self, upload_id: str) -> Path:
        if not upload_id.startswith("upload-") or not upload_id[7:].isalnum():
            raise NotFound(f"unknown upload {upload_id!r}")
        return self.root / upload_id

    def _request(self, upload_id: str) -> dict:
        try:
            return json.loads((self._dir(upload_id) / REQUEST_FILE).read_text())
        except (FileNotFoundError, ValueError):
            raise NotFound(f"unknown upload {upload_id!r}") from None

    def _check_not_claimed(self, upload_id: str, user: User) -> None:
        """UploadBeingFinished when another finish is importing `user`'s upload (to anyone
        else, it does not exist)."""
        try:
            owner = json.loads((self._dir(upload_id) / CLAIMED_FILE).read_text())["owner"]
        except (OSError, ValueError, KeyError):
            return
        if owner == user.name:
            raise UploadBeingFinished(f"upload {upload_id} is already being finished by another request; "
                                      "that request answers its checkpoint's path")

    def _remove_expired(self, now: dt.datetime) -> None:
        for directory in self.root.iterdir() if self.root.is_dir() else []:
            expires = 0  # a start that crashed before its request was written
            for name in (REQUEST_FILE, CLAIMED_FILE):  # claimed: a finish is importing it
                try:
                    expires = json.loads((directory / name).read_text())["expires"]
                    break
                except (OSError, ValueError, KeyError):
                    continue
            if expires < now.timestamp() - 60:
                shutil.rmtree(directory, ignore_errors=True)

    def start(self, user: User, base_model: str, lora_config: dict, project_id: str | None,
              url_base: str) -> tuple[str, dict[str, str], dt.datetime]:
        """(upload id, {file name: signed PUT URL}, when they expire). `base_model` must be served
        (the caller checks); the project, when given, one the user is a member of."""
        if project_id is not None and not user.reads_project(project_id):
            raise NotFound(f"unknown project {project_id!r}")
        now = utcnow()
        self._remove_expired(now)
        upload_id = f"upload-{uuid.uuid4().hex}"
        expires = now + UPLOAD_LIFETIME
        directory = self._dir(upload_id)
        directory.mkdir(parents=True)
        request = {"owner": user.name, "base_model": base_model, "lora_config": lora_config, "project_id": project_id,
                   "expires": expires.timestamp()}
        (directory / REQUEST_FILE).write_text(json.dumps(request))
        urls = {name: f"{url_base}?token={self.registry.sign_upload(upload_id, name, expires)}" for name in UPLOAD_FILES}
        return upload_id, urls, expires

    async def receive(self, token: str, chunks: AsyncIterator[bytes]) -> int:
        """Store one PUT file of an upload (Forbidden for a bad token); returns its size."""
        upload_id, file_name = self.registry.open_upload(token)
        if file_name not in UPLOAD_FILES:
            raise NotFound(f"{file_name} is not a file of a weights upload")
        directory = self._dir(upload_id)
        self._request(upload_id)  # finished or expired uploads take no more files
        limit = MAX_CONFIG_FILE_BYTES if file_name.endswith(".json") else MAX_UPLOAD_FILE_BYTES
        tmp = directory / f".{file_name}.tmp-{uuid.uuid4().hex[:8]}"
        size = 0
        try:
            with open(tmp, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise UploadTooLarge(f"{file_name} is larger than the upload limit of {limit} bytes")
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, directory / file_name)  # a PUT sent again replaces the file whole
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def finish(self, upload_id: str, user: User) -> str:
        """Import the uploaded adapter; returns the new checkpoint's tinker:// path."""
        from tinkerd.export import import_peft_dir
        from tinkerd.model_store import resolve_model

        try:
            request = self._request(upload_id)
        except NotFound:
            self._check_not_claimed(upload_id, user)
            raise
        if request["owner"] != user.name:
            raise NotFound(f"unknown upload {upload_id!r}")
        if request["expires"] < utcnow().timestamp():
            shutil.rmtree(self._dir(upload_id), ignore_errors=True)
            raise NotFound(f"upload {upload_id} has expired; start a new one")
        directory = self._dir(upload_id)
        missing = [name for name in UPLOAD_FILES if not (directory / name).is_file()]
        if missing:
            raise UserError(f"upload {upload_id} is missing {', '.join(missing)}: PUT every file to its URL before finishing")
        try:
            base = resolve_model(request["base_model"], self.data_dir)
        except ValueError as exc:
            raise UserError(f"cannot load base model {request['base_model']!r}: {exc}") from None
        lora_config = request["lora_config"]
        try:
            os.rename(directory / REQUEST_FILE, directory / CLAIMED_FILE)
        except FileNotFoundError:  # another finish claimed it since it was read above
            self._check_not_claimed(upload_id, user)
            raise NotFound(f"unknown upload {upload_id!r}") from None
        try:
            path = import_peft_dir(
                directory, self.registry.db, self.data_dir, base, user.name, kind="external_weights", name="uploaded",
                session_prefix="upload", tags=["weights-upload"], metadata={"upload_id": upload_id},
                project_id=request["project_id"], rank=int(lora_config["rank"]),
            )
        except BaseException:
            os.rename(directory / CLAIMED_FILE, directory / REQUEST_FILE)  # not imported: it may be finished again
            raise
        shutil.rmtree(directory, ignore_errors=True)
        return path
