"""StableReinforce bookkeeping: recorded samples and the provenance spans that name them.

A sample request with `record_stability_info` records, per sampled sequence, its prompt,
tokens and the sampler's own logprobs. A training datum's `loss_fn_input_spans` then say
which target positions are which sampled tokens; from them we lay the recorded sampler
logprobs onto the datum's targets (see docs/losses.md §2.7).
Records live for a day after their last use (sampling or training).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tinkerd.types import UserError

RETENTION_SECONDS = 24 * 3600


class ProvenanceError(UserError):
    """Spans that do not describe the datum, or name unknown/foreign sequences (user error)."""


@dataclass
class SequenceRecord:
    session_id: str
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    last_used: float = field(default_factory=time.time)


class StabilityStore:
    def __init__(self) -> None:
        self._records: dict[str, SequenceRecord] = {}

    def record(self, sequence_id: str, record: SequenceRecord) -> None:
        self._records[sequence_id] = record

    def get(self, sequence_id: str, session_id: str) -> SequenceRecord:
        record = self._records.get(sequence_id)
        if record is None or time.time() - record.last_used > RETENTION_SECONDS:
            raise ProvenanceError(f"sampled sequence {sequence_id!r} is unknown or expired (record_stability_info must be set when sampling)")
        if record.session_id != session_id:
            raise ProvenanceError(f"sampled sequence {sequence_id!r} belongs to another session")
        return record

    def expire(self) -> int:
        cutoff = time.time() - RETENTION_SECONDS
        stale = [k for k, r in self._records.items() if r.last_used < cutoff]
        for k in stale:
            del self._records[k]
        return len(stale)


def check_tiling(spans: list[tuple[str, str, int, int]], n: int, what: str) -> None:
    total = 0
    for _kind, sequence_id, offset, length in spans:
        if not sequence_id:
            raise ProvenanceError(f"{what}: a span has an empty sequence_id")
        if offset < 0 or length < 0:
            raise ProvenanceError(f"{what}: span offsets and lengths must be >= 0")
        total += length
    if total != n:
        raise ProvenanceError(f"{what}: spans cover {total} positions but the field has {n}")


def stability_for_datum(
    loss_fn_input_spans: list[tuple[str, str, int, int]],
    target_tokens: np.ndarray,
    store: StabilityStore,
    session_id: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(sampler_logprobs [N] float32, sampled_mask [N] bool) for one datum's targets."""
    n = len(target_tokens)
    sampler_lp = np.zeros(n, dtype=np.float32)
    mask = np.zeros(n, dtype=bool)
    pos = 0
    for kind, sequence_id, offset, length in loss_fn_input_spans:
        record = store.get(sequence_id, session_id)
        record.last_used = time.time()  # training use restarts the retention clock
        source = record.tokens if kind == "sampled" else record.prompt
        if offset + length > len(source):
            raise ProvenanceError(
                f"span {kind}({sequence_id}, {offset}, {length}) runs past the recorded {kind} of length {len(source)}"
            )
        expected = np.asarray(source[offset : offset + length], dtype=np.int64)
        if not np.array_equal(expected, target_tokens[pos : pos + length].reshape(-1)):
            raise ProvenanceError(f"target_tokens at {pos}..{pos + length} differ from the recorded {kind} tokens of {sequence_id}")
        if kind == "sampled":
            sampler_lp[pos : pos + length] = record.logprobs[offset : offset + length]
            mask[pos : pos + length] = True
        pos += length
    return sampler_lp, mask
