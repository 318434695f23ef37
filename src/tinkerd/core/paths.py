"""Names of things in tinkerd: `tinker://` checkpoint paths and checkpoint names."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tinkerd.types import UserError

# Path segment → the SDK's checkpoint_type.
CHECKPOINT_KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9._\-]{1,200}$")


@dataclass(frozen=True)
class TinkerPath:
    """tinker://<run>/<kind>/<name>: one checkpoint of one training run."""

    run_id: str
    kind: str
    name: str

    @classmethod
    def parse(cls, path: str) -> TinkerPath:
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise UserError(f"not a tinker:// path: {path!r}")
        parts = path.removeprefix("tinker://").split("/")
        if len(parts) != 3 or not all(parts) or parts[1] not in CHECKPOINT_KINDS:
            raise UserError(
                f"malformed tinker path {path!r}: expected tinker://<run>/<weights|sampler_weights|external_weights>/<name>"
            )
        return cls(*parts)

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"


def check_checkpoint_name(name: object) -> str:
    if not isinstance(name, str) or not CHECKPOINT_NAME.match(name):
        raise UserError(f"invalid checkpoint name {name!r}: use letters, digits, '.', '_' or '-' (no '/')")
    return name
