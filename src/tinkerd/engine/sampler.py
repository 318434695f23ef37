"""Sampling for one base model: continuous batching over a shared KV cache.

New requests are prefilled (in shared passes, grouped by adapter) and their rows join the
running batch; every decode step advances each active row by one token; finished rows
leave and the cache is compacted. Rows of any number of adapters share a step (grouped
LoRA). Runs on the engine thread only (the scheduler calls it); requests reach it checked
by `core/sampling.py`. docs/engine.md tells the rules.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinkerd.engine.meter import EngineMeter
from tinkerd.engine.model import AdapterBatch, AdapterSegment, GroupedLora, KVCache, LlamaModel, LoraStacks, LoraWeights
from tinkerd.engine.peft_io import read_checkpoint_dir
from tinkerd.engine.prefix_cache import MIN_HIT_TOKENS, PrefixCache, PrefixEntry
from tinkerd.engine.sampling import choose_tokens, make_generator
from tinkerd.engine.trainer import TOKENS_PER_TRAIN_PASS, token_budget_groups
from tinkerd.types import AdapterRef, SampledSequence, SampleRequest, SampleResult, TokenEvent, UserError

log = logging.getLogger(__name__)

KV_LENGTH_STEP = 256  # the KV cache grows in length as rows need it, not by max_tokens up front
# Fair sharing between tenants (docs/engine.md §4.7). While more than one tenant has rows, a
# decode step advances the rows of "light" tenants (at most LIGHT_TENANT_ROWS rows each) and
# as many of the others' as keep the step at SHARED_STEP_ROWS rows (at least half of them):
# a lone request then decodes at close to its idle speed beside a flood of another's.
LIGHT_TENANT_ROWS = 4
SHARED_STEP_ROWS = {"cpu": 8, "cuda": 256}
# Prompt tokens prefilled per admission round, taken from tenants in turn: a flood of prompts
# is prefilled over several rounds, with decode steps and other tenants' requests between.
PREFILL_TOKENS_PER_ROUND = {"cpu": 2048, "cuda": 16384}
IDLE_KV_CACHE_BYTES = 64 * 2**20  # an idle sampler keeps a cache up to this size (or 1/8 of the budget)
PREFIX_CACHE_SHARE = 8  # the prompt-prefix cache may hold 1/8 of the KV budget's size unless told


def default_kv_budget_bytes(device: torch.device) -> int:
    """Memory the KV cache may take unless the server is told (`--kv-cache-gb`): half of the
    GPU memory still free once the model is loaded, or a quarter of the machine's RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def _tenants_in_turn(pending: list[PendingSample]) -> list[PendingSample]:
    """The requests one per tenant in turn (each tenant's own in their order), so a flood of
    one tenant's requests does not keep another's behind all of it."""
    queues: dict[str, list[PendingSample]] = {}
    for item in pending:
        queues.setdefault(item.request.tenant, []).append(item)
    if len(queues) < 2:
        return pending
    turns: list[PendingSample] = []
    for depth in range(max(len(q) for q in queues.values())):
        turns.extend(q[depth] for q in queues.values() if depth < len(q))
    return turns


def _weights_identity(request: SampleRequest) -> str | None:
    """The weights a request runs on, for the prefix cache: the adapter's key (AdapterRef: a
    key names one set of weights and never two, in-flight versions included), None for the
    base model."""
    return None if request.adapter is None else request.adapter.key


def _may_reuse_prefix(request: SampleRequest) -> bool:
    """Whether a request's prompt may start from cached K/V: not when it asks for scores of its
    prompt tokens (they need every position's hidden state, which the cache does not keep)."""
    return not request.prompt_logprobs and request.topk_prompt_logprobs == 0


def _extent(request: SampleRequest) -> int:
    """Token slots one row of `request` may fill: its prompt and every token it may sample."""
    return len(request.prompt) + request.params.max_tokens + 1


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
TokenSink = Callable[[TokenEvent], None]


class Cancellations:
    """Samples whose callers no longer want them (a client hung up, or found a stop string).

    Written from any thread (`EngineClient.cancel`), read by the sampler after each token.
    Only requests that are queued or running are tracked, so a late cancel leaves nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, set[int | None]] = {}

    def track(self, request_id: str) -> None:
        if request_id:
            with self._lock:
                self._live.setdefault(request_id, set())

    def cancel(self, request_id: str, sample_index: int | None) -> None:
        with self._lock:
            if request_id in self._live:
                self._live[request_id].add(sample_index)

    def is_cancelled(self, request_id: str, sample_index: int) -> bool:
        cancelled = self._live.get(request_id)
        return bool(cancelled) and (None in cancelled or sample_index in cancelled)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._live.pop(request_id, None)


@dataclass
class PendingSample:
    request: SampleRequest
    future: Future
    on_token: TokenSink | None = None
    submitted: float = field(default_factory=time.perf_counter)  # for the time to first token


@dataclass
class _ActiveSample:
    request: SampleRequest
    future: Future
    adapter: LoraWeights | None
    result: SampleResult
    remaining: int
    on_token: TokenSink | None


@dataclass
class _Row:
    request: _ActiveSample
    index: int
    generator: torch.Generator
    position: int  # where the next input token goes
    last_token: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_lps: list[list[float]] = field(default_factory=list)
    done: bool = False


class AdapterCache:
    """Sampler adapters by key, least recently used first out: a checkpoint is read from disk
    once, then served from memory (and its decode-kernel layout is kept with it)."""

    def __init__(self, size: int, device: torch.device, dtype: torch.dtype, meter: EngineMeter | None = None):
        self._entries: OrderedDict[str, LoraWeights] = OrderedDict()
        # Training model id → its newest in-flight weights. Not in the LRU: they exist only here.
        self._inflight: dict[str, tuple[AdapterRef, LoraWeights]] = {}
        self.size = size
        self.device = device
        self.dtype = dtype
        self.meter = meter or EngineMeter()

    def __len__(self) -> int:
        return len(self._entries) + len(self._inflight)

    def publish_inflight(self, ref: AdapterRef, weights: LoraWeights) -> None:
        """`weights` become the in-flight weights of `ref.inflight_of` (an older version is
        let go; rows decoding on it keep it until they finish)."""
        held = self._inflight.get(ref.inflight_of)  # type: ignore[arg-type]
        if held is None or held[0].version < ref.version:
            self._inflight[ref.inflight_of] = (ref, weights)  # type: ignore[index]

    def drop_inflight(self, model_id: str) -> None:
        self._inflight.pop(model_id, None)

    def resolve(self, ref: AdapterRef | None) -> tuple[AdapterRef | None, LoraWeights | None]:
        """(the ref a request runs on, its weights): `ref` itself, or for in-flight weights
        the newest version published (AdapterRef.inflight_of)."""
        if ref is None or ref.inflight_of is None:
            return ref, self.get(ref)
        held = self._inflight.get(ref.inflight_of)
        if held is None or held[0].version < ref.version:
            raise UserError(f"the in-flight weights of {ref.inflight_of} are gone: its training session ended, or the "
                            "engine restarted; save weights for a new sampling client")
        self.meter.count("adapter_cache_hits")
        return held

    def put(self, key: str, weights: LoraWeights) -> None:
        self._entries[key] = weights
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
            self.meter.count("adapter_cache_evictions")

    def get(self, ref: AdapterRef | None) -> LoraWeights | None:
        if ref is None:
            return None
        cached = self._entries.get(ref.key)
        if cached is not None:
            self._entries.move_to_end(ref.key)
            self.meter.count("adapter_cache_hits")
            return cached
        self.meter.count("adapter_cache_misses")
        _, weights = read_checkpoint_dir(Path(ref.directory), self.device)
        weights = LoraWeights(
            a={k: v.to(self.dtype) for k, v in weights.a.items()},
            b={k: v.to(self.dtype) for k, v in weights.b.items()},
            scale=weights.scale,
        )
        self.put(ref.key, weights)
        return weights


class Sampler:
    def __init__(self, model: LlamaModel, tokenizer, adapters: AdapterCache, cancellations: Cancellations,
                 kv_budget_bytes: int | None = None, prefix_cache_bytes: int | None = None):
        self.model = model
        self.cfg = model.cfg
        self.device = model.device
        self.dtype = model.dtype
        self.tokenizer = tokenizer  # for stop strings
        self.adapters = adapters
        self.cancellations = cancellations
        self.max_context = model.cfg.max_context
        self.rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._lora_stacks: OrderedDict = OrderedDict()  # adapter set → stacked LoRA weights for mixed decode
        self.stats = {"decode_steps": 0, "prefill_passes": 0}
        self.meter = adapters.meter
        # The KV cache's memory budget, in token slots (one token of one row, every layer's K and V).
        cfg = model.cfg
        self.kv_slot_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=self.dtype).element_size()
        self.kv_budget_bytes = kv_budget_bytes if kv_budget_bytes is not None else default_kv_budget_bytes(self.device)
        self.kv_budget_slots = max(1, self.kv_budget_bytes // self.kv_slot_bytes)
        # Prompt K/V kept for later requests that begin alike (0: off); beside the KV budget.
        self.prefix_cache = PrefixCache(
            prefix_cache_bytes if prefix_cache_bytes is not None else self.kv_budget_bytes // PREFIX_CACHE_SHARE)

    # -- admission -------------------------------------------------------------------------

    def admit(self, pending: list[PendingSample]) -> list[PendingSample]:
        """Prefill waiting requests, in shared passes, and add their rows to the batch: tenants
        in turn (docs/engine.md §4.7), as many as one prefill round and the KV budget allow.
        Returns the rest, in the order to take them next: those past the KV budget (the first
        that does not fit and every later one: none overtakes it), then those past the round."""
        pending, later = self._prefill_round(_tenants_in_turn(pending))
        pending, waiting = self._within_kv_budget(pending)
        waiting += later
        ready: list[tuple[PendingSample, LoraWeights | None]] = []
        for item in pending:
            if not item.future.set_running_or_notify_cancel():
                self.cancellations.forget(item.request.request_id)
                continue
            try:
                item.request.adapter, weights = self.adapters.resolve(item.request.adapter)
                ready.append((item, weights))
            except BaseException as exc:  # noqa: BLE001 - this request alone fails
                self.cancellations.forget(item.request.request_id)
                item.future.set_exception(exc)
        # Requests of one adapter side by side: a prefill pass runs one LoRA product per run of
        # rows with the same adapter (requests alternating between 8 checkpoints made 32 runs).
        first_seen: dict[int, int] = {}
        ready.sort(key=lambda item: first_seen.setdefault(id(item[1]), len(first_seen)))
        # Prompts that begin like an earlier one of this round wait for its K/V (docs/engine.md §4.8).
        for wave in self._leaders_first(ready):
            hits = self._cached_prefixes(wave)
            for group in self._prefill_groups(wave, hits):
                touched: set[int] = set()
                try:
                    self._prefill(group, touched, hits)
                except BaseException as exc:  # noqa: BLE001 - retried one request at a time below
                    self._prefill_one_by_one(group, touched, exc, hits)
        return waiting

    def _leaders_first(self, ready: list[tuple[PendingSample, LoraWeights | None]]) -> list[list]:
        """The round's requests in two waves: the second holds those with no cached prefix whose
        prompt begins like an earlier one's of the same weights (a group of samples of one
        prompt sent as separate requests): prefilled after the first wave, they start from
        its K/V instead of all computing the same prefix side by side."""
        if not self.prefix_cache.enabled:
            return [ready]
        first, second = [], []
        heads: set[tuple] = set()
        for pair in ready:
            request = pair[0].request
            if len(request.prompt) <= MIN_HIT_TOKENS:
                first.append(pair)
                continue
            head = (_weights_identity(request), tuple(request.prompt[:MIN_HIT_TOKENS]))
            if (head in heads and _may_reuse_prefix(request)
                    and self.prefix_cache.lookup(_weights_identity(request), request.prompt)[0] is None):
                second.append(pair)
            else:
                heads.add(head)
                first.append(pair)
        return [first, second] if second else [first]

    def _cached_prefixes(self, wave: list[tuple[PendingSample, LoraWeights | None]]) -> dict[int, tuple[PrefixEntry, int]]:
        """id(request) → (entry, n): the first n prompt tokens' K/V are in the prefix cache."""
        hits = {}
        for item, _ in wave:
            if _may_reuse_prefix(item.request):
                entry, n = self.prefix_cache.lookup(_weights_identity(item.request), item.request.prompt)
                if entry is not None:
                    hits[id(item)] = (entry, n)
        return hits

    def _prefill_groups(self, wave: list, hits: dict[int, tuple[PrefixEntry, int]]) -> list[list]:
        """The passes of a wave: requests that go on from a cached prefix of the same length
        share passes (their rows then start at one position), the others share theirs."""
        by_start: dict[int, list] = {}
        for pair in wave:
            hit = hits.get(id(pair[0]))
            by_start.setdefault(hit[1] if hit else 0, []).append(pair)
        groups = []
        for start, pairs in sorted(by_start.items(), reverse=True):
            groups += token_budget_groups(pairs, TOKENS_PER_TRAIN_PASS, key=lambda item, s=start: len(item[0].request.prompt) - s)
        return groups

    def _prefill_round(self, pending: list[PendingSample]) -> tuple[list[PendingSample], list[PendingSample]]:
        """(this round's requests, the rest): as many as PREFILL_TOKENS_PER_ROUND prompt tokens
        to compute allow (those the prefix cache holds cost nothing), at least one."""
        budget = PREFILL_TOKENS_PER_ROUND.get(self.device.type, PREFILL_TOKENS_PER_ROUND["cuda"])
        taken = 0
        for i, item in enumerate(pending):
            request = item.request
            cached = 0
            if self.prefix_cache.enabled and _may_reuse_prefix(request):
                cached = min(self.prefix_cache.cached_length(_weights_identity(request), request.prompt), len(request.prompt) - 1)
                cached = cached if cached >= MIN_HIT_TOKENS else 0
            taken += (len(request.prompt) - cached) * request.num_samples
            if taken > budget and i > 0:
                return pending[:i], pending[i:]
        return pending, []

    def _within_kv_budget(self, pending: list[PendingSample]) -> tuple[list[PendingSample], list[PendingSample]]:
        """(admit now, wait), by the KV cache each request could need at most: its samples x
        (prompt + max_tokens). The cache is one rectangle (rows x the longest row), so what
        counts is every row's count times the longest extent. A request that could never fit,
        even alone, fails here with a message saying what to ask for instead."""
        rows = len(self.rows)
        length = max((_extent(row.request.request) for row in self.rows), default=0)
        admitted: list[PendingSample] = []
        for i, item in enumerate(pending):
            request = item.request
            extent = _extent(request)
            if request.num_samples * extent > self.kv_budget_slots:
                if item.future.set_running_or_notify_cancel():
                    self.cancellations.forget(request.request_id)
                    item.future.set_exception(UserError(
                        f"this request may need {_gib(request.num_samples * extent * self.kv_slot_bytes)} of KV cache "
                        f"({request.num_samples} samples x ({len(request.prompt)} prompt + {request.params.max_tokens} "
                        f"max_tokens) tokens), more than the server's budget of {_gib(self.kv_budget_bytes)}: "
                        "ask for fewer samples or fewer max_tokens", field="max_tokens"))
                continue
            if (rows + request.num_samples) * max(length, extent) > self.kv_budget_slots:
                return admitted, pending[i:]
            rows, length = rows + request.num_samples, max(length, extent)
            admitted.append(item)
        return admitted, []

    def _cache_shape(self, need_rows: int, need_len: int, want_rows: int, want_len: int) -> tuple[int, int]:
        """The cache to allocate: at least the need, up to the wanted headroom, within the budget."""
        length = max(need_len, min(want_len, self.kv_budget_slots // max(need_rows, 1)))
        return max(need_rows, min(want_rows, self.kv_budget_slots // length)), length

    def _prefill_one_by_one(self, group: list[tuple[PendingSample, LoraWeights | None]], touched: set[int],
                            exc: BaseException, hits: dict[int, tuple[PrefixEntry, int]]) -> None:
        """A shared prefill pass failed: each request it had not started yet is prefilled on its
        own, so a request whose values fail a pass fails alone and the others go on. A request
        the pass had started (it may have streamed a token) and not placed fails with it."""
        if len(group) == 1:
            log.exception("prefill failed", exc_info=exc)
        else:
            log.warning("a prefill pass of %d requests failed (%s: %s); prefilling them one by one",
                        len(group), type(exc).__name__, exc)
        running = {id(row.request.future) for row in self.rows}
        for item, adapter in group:
            if item.future.done() or id(item.future) in running:
                continue
            if len(group) == 1 or id(item) in touched:
                self._fail_pending(item, exc)
                continue
            try:
                self._prefill([(item, adapter)], set(), hits)
            except BaseException as alone:  # noqa: BLE001 - this request alone fails
                log.exception("prefill of request %s failed", item.request.request_id)
                self._fail_pending(item, alone)

    def _fail_pending(self, item: PendingSample, exc: BaseException) -> None:
        if not item.future.done():
            self.cancellations.forget(item.request.request_id)
            item.future.set_exception(exc)

    def _prefill(self, group: list[tuple[PendingSample, LoraWeights | None]], touched: set[int],
                 hits: dict[int, tuple[PrefixEntry, int]]) -> None:
        """One causal pass over right-padded prompts (row i uses request i's adapter). The
        requests whose rows it has created are added to `touched`. Requests in `hits` (all of
        the group or none, with one prefix length: `_prefill_groups`) compute only the rest of
        their prompt, attending to the cached K/V of its start."""
        hit = hits.get(id(group[0][0]))
        start = hit[1] if hit else 0
        lengths = [len(item.request.prompt) - start for item, _ in group]  # positions this pass computes
        tokens = torch.zeros(len(group), max(lengths), dtype=torch.long)
        for i, (item, _) in enumerate(group):
            tokens[i, : lengths[i]] = torch.tensor(item.request.prompt[start:])
        tokens = tokens.to(self.device)
        past = self._past(group, hits, start) if start else None
        segments: list[AdapterSegment] = []
        for i, (_, adapter) in enumerate(group):
            if segments and segments[-1].adapter is adapter:
                segments[-1].end = i + 1
            else:
                segments.append(AdapterSegment(i, i + 1, adapter))
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stats["prefill_passes"] += 1
        self.meter.count("prefill_tokens", sum(lengths))
        if start:
            self.meter.count("prefix_cache_hit_tokens", start * len(group))
        batch = AdapterBatch(segments)
        hidden = self.model.hidden_states(tokens, batch, kv_out=kv, past=past)
        # Every prompt's last position in one unembedding: its logits give the first token.
        last_index = torch.tensor([n - 1 for n in lengths], device=self.device)  # in this pass's positions
        last_hidden = hidden[torch.arange(len(group), device=self.device), last_index][:, None]
        last_logits = self.model.logits(last_hidden, batch)[:, 0]
        started: list[tuple[list[_Row], list, int, int]] = []
        row_sources: list[int] = []
        for i, (item, adapter) in enumerate(group):
            request = item.request
            n = len(request.prompt)
            try:
                prompt_logits = None
                if request.prompt_logprobs or request.topk_prompt_logprobs > 0:  # then start is 0: _may_reuse_prefix
                    prompt_logits = self.model.logits(hidden[i : i + 1, :n], AdapterBatch.single(adapter, 1))[0]
                rows = self._start_request(item, adapter, tokens[i, :n], prompt_logits, start)
            except BaseException as exc:  # noqa: BLE001 - its own prompt scores: this request alone fails
                log.exception("prompt scores of request %s failed", request.request_id)
                self._fail_pending(item, exc)
                continue
            touched.add(id(item))
            self._keep_prompt(request, [(k[i, :, :n], v[i, :, :n]) for k, v in kv])
            if rows:
                own_kv = [(k[i : i + 1, :, :n], v[i : i + 1, :, :n]) for k, v in kv]
                started.append((rows, own_kv, n, request.params.max_tokens))
                row_sources += [i] * len(rows)
        if not started:
            return
        # The first token of every sample of every request in one batched choice.
        self._accept_tokens([row for rows, *_ in started for row in rows], last_logits[torch.tensor(row_sources, device=self.device)])
        now = time.perf_counter()
        for item, _ in group:
            self.meter.observe("time_to_first_token", now - item.submitted)
        for rows, own_kv, n, max_tokens in started:
            live = [row for row in rows if not row.done]
            if live:
                self._place_rows(live, own_kv, n, max_tokens)

    def _past(self, group: list, hits: dict[int, tuple[PrefixEntry, int]], start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's K/V [rows, kv_heads, start, head_dim] of the group's cached prefixes."""
        entries = [hits[id(item)][0] for item, _ in group]
        if all(entry is entries[0] for entry in entries):  # one prompt's samples: a view, not copies
            k = entries[0].k[:, None, :, :start].expand(-1, len(group), -1, -1, -1)
            v = entries[0].v[:, None, :, :start].expand(-1, len(group), -1, -1, -1)
        else:
            k = torch.stack([entry.k[:, :, :start] for entry in entries], dim=1)
            v = torch.stack([entry.v[:, :, :start] for entry in entries], dim=1)
        return list(zip(k.unbind(0), v.unbind(0), strict=True))

    def _keep_prompt(self, request: SampleRequest, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A prefilled prompt's K/V (each layer's [kv_heads, len(prompt), head_dim]) into the
        prefix cache, for later requests that begin alike. Failing to keep it fails nothing."""
        if not self.prefix_cache.enabled:
            return
        try:
            evicted = self.prefix_cache.evictions
            self.prefix_cache.insert(_weights_identity(request), request.prompt, kv)
            self.meter.count("prefix_cache_evictions", self.prefix_cache.evictions - evicted)
        except Exception:  # noqa: BLE001 - a cache only: the request goes on without it
            log.warning("keeping the prompt of request %s in the prefix cache failed", request.request_id, exc_info=True)

    def _start_request(
        self, item: PendingSample, adapter: LoraWeights | None, tokens: torch.Tensor, prompt_logits: torch.Tensor | None,
        cached_tokens: int = 0,
    ) -> list[_Row]:
        """A prefilled request's prompt scores (from `prompt_logits`, every position, when it
        asked for them) and its sample rows, which still need their first token.
        `cached_tokens`: how many of its prompt tokens came from the prefix cache."""
        request = item.request
        prompt = request.prompt
        params = request.params
        result = SampleResult(sequences=[], prompt_cache_hit_tokens=cached_tokens)
        if prompt_logits is not None:
            lsm = torch.log_softmax(prompt_logits[:-1], dim=-1)
            if request.prompt_logprobs:
                got = lsm.gather(-1, tokens[1:, None])[:, 0]
                result.prompt_logprobs = [float("nan")] + got.cpu().tolist()
                if request.prompt_logprobs_last_n is not None:
                    cut = min(len(prompt), max(0, len(prompt) - request.prompt_logprobs_last_n))
                    result.prompt_logprobs[:cut] = [float("nan")] * cut
            k = min(request.topk_prompt_logprobs, lsm.shape[-1])
            if k > 0:
                top = torch.topk(lsm, k, dim=-1)
                result.topk_prompt_ids = [[0] * k] + top.indices.cpu().tolist()
                result.topk_prompt_logprobs = [[-99999.0] * k] + top.values.cpu().tolist()
        active = _ActiveSample(request, item.future, adapter, result, remaining=request.num_samples, on_token=item.on_token)
        result.sequences = [None] * request.num_samples  # type: ignore[list-item]
        if params.max_tokens == 0:
            for i in range(request.num_samples):
                result.sequences[i] = SampledSequence(tokens=[], logprobs=[], stop_reason="length")
            self.cancellations.forget(request.request_id)
            item.future.set_result(result)
            return []
        return [
            _Row(active, i, make_generator(params.seed, i, self.device), position=len(prompt), last_token=-1)
            for i in range(request.num_samples)
        ]

    def _place_rows(self, rows: list[_Row], kv: list, prompt_len: int, max_tokens: int) -> None:
        need_rows = len(self.rows) + len(rows)
        # max_tokens defaults to the rest of the context (8k for SmolLM2): reserving it all up front
        # cost GBs per request; decode_step grows the length when a row reaches the end.
        need_len = max(prompt_len + min(max_tokens, KV_LENGTH_STEP) + 1, max((r.position + 1 for r in self.rows), default=0))
        if self._cache is None:
            rows_cap, length = self._cache_shape(need_rows, need_len, max(8, need_rows), max(256, need_len))
            self._cache = KVCache(self.cfg, rows_cap, length, self.device, self.dtype)
        elif need_rows > self._cache.rows or need_len > self._cache.length:
            # Doubling, as far as the budget allows (the rows' own need always fits: admission checked it).
            self._cache = self._cache.resized(*self._cache_shape(
                need_rows, need_len,
                2 * self._cache.rows if need_rows > self._cache.rows else self._cache.rows,
                2 * self._cache.length if need_len > self._cache.length else self._cache.length,
            ))
        start = len(self.rows)
        for layer, (k, v) in enumerate(kv):
            self._cache.k[layer, start : start + len(rows), :, :prompt_len] = k[0]
            self._cache.v[layer, start : start + len(rows), :, :prompt_len] = v[0]
        self.rows.extend(rows)
        tenant = rows[0].request.request.tenant
        if sum(1 for row in self.rows if row.request.request.tenant == tenant) <= LIGHT_TENANT_ROWS:
            for index in range(start, start + len(rows)):
                self._to_front(index)

    def _light_rows(self) -> int:
        """How many leading rows belong to light tenants (they come first: `_to_front`)."""
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.request.request.tenant] = counts.get(row.request.request.tenant, 0) + 1
        n = 0
        while n < len(self.rows) and counts[self.rows[n].request.request.tenant] <= LIGHT_TENANT_ROWS:
            n += 1
        return n

    def _to_front(self, index: int) -> None:
        """Move row `index` to just after the light tenants' rows, the row there to `index`
        (one swap of two cache rows)."""
        front = self._light_rows()
        if front >= index:
            return
        self._cache.swap_rows(front, index)
        self.rows[front], self.rows[index] = self.rows[index], self.rows[front]

    def _step_rows(self) -> int:
        """How many leading rows the next decode step advances (all, unless tenants share)."""
        n = len(self.rows)
        if len({row.request.request.tenant for row in self.rows}) < 2:
            return n
        light = self._light_rows()
        if light in (0, n):  # nobody to protect, or nobody to hold back
            return n
        shared = SHARED_STEP_ROWS.get(self.device.type, SHARED_STEP_ROWS["cuda"])
        return min(n, max(shared, light + shared // 2))

    # -- tokens ----------------------------------------------------------------------------

    def _accept_tokens(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose the next token of every row from its logits [n, V] and check stop conditions.

        All tensor work is batched; one host transfer brings back every row's token and
        logprob. Randomness comes from each row's own generator, so a row's token depends
        only on its seed and its logits.
        """
        try:
            choice = choose_tokens(logits, [r.request.request.params for r in rows], [r.generator for r in rows])
            logprobs = torch.log_softmax(logits, dim=-1)
            picked = logprobs.gather(-1, choice[:, None])[:, 0]
            k = min(max(r.request.request.topk_sample_logprobs for r in rows), logprobs.shape[-1])
            top = torch.topk(logprobs, k, dim=-1) if k > 0 else None
        except BaseException as exc:  # noqa: BLE001 - retried one request at a time
            self._accept_one_by_one(rows, logits, exc)
            return
        tokens = choice.tolist()
        token_lps = picked.tolist()
        self.meter.count("decode_tokens", len(rows))
        top_ids = top.indices.tolist() if top is not None else None
        top_lps = top.values.tolist() if top is not None else None
        for i, row in enumerate(rows):
            if row.done:
                continue  # its request failed at an earlier row of this step
            try:
                self._take_token(row, tokens[i], token_lps[i], top_ids[i] if top_ids is not None else None,
                                 top_lps[i] if top_lps is not None else None)
            except BaseException as exc:  # noqa: BLE001 - its own stop check or token sink: this request alone fails
                log.exception("request %s failed while taking a token", row.request.request.request_id)
                self._fail_request(row.request, rows, exc)

    def _accept_one_by_one(self, rows: list[_Row], logits: torch.Tensor, exc: BaseException) -> None:
        """The batched token choice failed: each request's rows choose on their own, so a
        request whose values fail the choice fails alone and the others go on."""
        by_request: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_request.setdefault(id(row.request), []).append(i)
        if len(by_request) == 1:
            log.exception("token choice failed", exc_info=exc)
            self._fail_request(rows[0].request, rows, exc)
            return
        for indices in by_request.values():
            own = [rows[i] for i in indices]
            try:
                self._accept_tokens(own, logits[torch.tensor(indices, device=logits.device)])
            except BaseException as alone:  # noqa: BLE001 - this request alone fails
                log.exception("token choice of request %s failed", own[0].request.request.request_id)
                self._fail_request(own[0].request, rows, alone)

    def _fail_request(self, active: _ActiveSample, step_rows: list[_Row], exc: BaseException) -> None:
        """Fail one request: its rows (in the batch, or in `step_rows` not yet placed) are done."""
        for row in (*self.rows, *step_rows):
            if row.request is active:
                row.done = True
        if not active.future.done():
            self.cancellations.forget(active.request.request_id)
            active.future.set_exception(exc)

    def _take_token(self, row: _Row, token: int, token_lp: float, top_ids: list[int] | None,
                    top_lps: list[float] | None) -> None:
        """Append a chosen token to its row, stream it, and check the row's stop conditions."""
        active = row.request
        req = active.request
        params = req.params
        row.tokens.append(token)
        row.logprobs.append(token_lp)
        top_pairs = None
        if req.topk_sample_logprobs > 0 and top_ids is not None and top_lps is not None:
            row.topk_ids.append(top_ids[: req.topk_sample_logprobs])
            row.topk_lps.append(top_lps[: req.topk_sample_logprobs])
            top_pairs = tuple(zip(row.topk_ids[-1], row.topk_lps[-1], strict=True))
        if active.on_token is not None:
            active.on_token(TokenEvent(row.index, token, token_lp, top_pairs))
        row.last_token = token
        stop = (not params.ignore_eos and token in self.cfg.eos_token_ids) or token in params.stop_token_ids
        if not stop and params.stop_strings:
            text = self.tokenizer.decode(row.tokens[-64:], skip_special_tokens=False)
            stop = any(s in text for s in params.stop_strings)
        if not stop and req.request_id:
            stop = self.cancellations.is_cancelled(req.request_id, row.index)
        if stop or len(row.tokens) >= params.max_tokens:
            self._finish_row(row, "stop" if stop else "length")

    def _finish_row(self, row: _Row, reason: str) -> None:
        row.done = True
        active = row.request
        active.result.sequences[row.index] = SampledSequence(
            tokens=row.tokens,
            logprobs=row.logprobs,
            stop_reason=reason,
            topk_ids=row.topk_ids or None,
            topk_logprobs=row.topk_lps or None,
        )
        active.remaining -= 1
        if active.remaining == 0 and not active.future.done():
            self.cancellations.forget(active.request.request_id)
            active.future.set_result(active.result)

    # -- decode ----------------------------------------------------------------------------

    def decode_step(self) -> None:
        self.stats["decode_steps"] += 1
        everyone = self.rows
        n = self._step_rows()
        rows = everyone[:n]  # the rest wait this step out (tenants sharing: `_step_rows`)
        need_len = max(r.position for r in everyone) + 1
        if self._cache is not None and need_len > self._cache.length:
            want_len = max(need_len, min(2 * self._cache.length, self.max_context + 1))
            self._cache = self._cache.resized(*self._cache_shape(len(everyone), need_len, self._cache.rows, want_len))
        tokens = torch.tensor([[r.last_token] for r in rows], device=self.device)
        positions = torch.tensor([[r.position] for r in rows], device=self.device)
        batch = row_adapter_batch([r.request.adapter for r in rows], self.device, self._lora_stacks, self.model.kernels)
        hidden = self.model.hidden_states(tokens, batch, positions=positions, cache=self._cache)
        logits = self.model.logits(hidden, batch, decoding=True)[:, 0]
        for row in rows:
            row.position += 1
        self._accept_tokens(rows, logits)
        # Compact: live rows move down, in order, to 0..m-1 (their cache rows with them).
        cache = self._cache
        if any(row.done for row in rows):
            live = [i for i in range(len(everyone)) if not everyone[i].done]
            for dst, src in enumerate(live):
                if dst != src:
                    cache.move_row(src, dst)
            self.rows = [everyone[i] for i in live]
        if not self.rows and cache.cells * self.kv_slot_bytes > max(IDLE_KV_CACHE_BYTES, self.kv_budget_bytes // 8):
            self._cache = None  # a burst is over: its memory goes back (the next request allocates anew)

    def fail_all(self, exc: BaseException) -> None:
        """A decode step failed: every active request fails with it; the engine keeps serving."""
        for row in self.rows:
            if not row.request.future.done():
                self.cancellations.forget(row.request.request.request_id)
                row.request.future.set_exception(exc)
        self.rows.clear()


def row_adapter_batch(
    adapters: list[LoraWeights | None], device: torch.device, stack_cache: OrderedDict, kernels=None,
) -> AdapterBatch:
    """Decode rows by adapter: the base alone → plain; otherwise grouped batched LoRA (with
    cached stacks, q/k/v and gate/up updates fused), even when every row has one adapter."""
    if all(a is None for a in adapters):
        return AdapterBatch.single(None, len(adapters))
    # The set of adapters, in a fixed order whatever the rows' order: rows arriving in another
    # order (or a row leaving and joining) must find the stacks already built, not copy them again.
    distinct = sorted({id(a): a for a in adapters}.values(), key=id)
    order = {id(a): g for g, a in enumerate(distinct)}
    key = tuple(order)
    stacks = stack_cache.get(key)
    if stacks is None:
        stacks = stack_cache[key] = LoraStacks(tuple(distinct))
        while len(stack_cache) > 4:
            stack_cache.popitem(last=False)
    stack_cache.move_to_end(key)
    grouped = GroupedLora.build(stacks, [order[id(a)] for a in adapters], device, kernels)
    return AdapterBatch([AdapterSegment(0, len(adapters), None)], grouped=grouped)
