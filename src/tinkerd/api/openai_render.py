"""The OpenAI response side: sampled tokens into text, logprobs and server-sent events.

Text is cut before the first stop string, as OpenAI does (the engine stops *at* a stop
string but does not trim); EOS ends a sample without being part of its text. Streaming
and non-streaming responses are built from the same `ChoiceText`, so they agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from tinkerd.types import SampleResult

# -- tokens to text --------------------------------------------------------------------------


class Detokenizer:
    """Text of a growing token sequence, by whole characters.

    Decodes a short window (a few tokens of context plus the new ones) and holds back the
    bytes of an incomplete UTF-8 character (decoded as U+FFFD) until the token that
    completes it arrives. The context tokens let tokenizers that drop a leading space at
    the start of a decode (SentencePiece) get the first generated word right.

    Not `tokenizers.decoders.DecodeStream`, which does the same for most text but not for
    two cases a completion meets: prefilled with the prompt's last tokens, it emits the
    prompt's own text when the prompt ends inside a multi-byte character; and it never
    gives out an incomplete last character, so a completion cut there by max_tokens would
    stream other text than `tokenizer.decode` of its tokens (this class ends it with U+FFFD,
    as `decode` does).
    """

    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer: Any, context: list[int], skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids = list(context[-self.CONTEXT_TOKENS:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens whose text was already returned

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


def partial_stop_overlap(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


@dataclass
class TokenOut:
    token: int
    logprob: float
    top: list[tuple[int, float]] | None  # the top-k alternatives, when asked for
    start: int  # character span of its text in the choice's text
    end: int


@dataclass
class ChoiceText:
    """One choice's output: text cut before the first stop string, and the tokens behind it.

    Streaming and non-streaming responses are both built from this, so they agree. Text is
    released as soon as it can no longer turn out to be the start of a stop string.
    """

    detok: Detokenizer
    stops: list[str]
    eos_ids: frozenset[int]
    text: str = ""
    tokens: list[TokenOut] = field(default_factory=list)
    pushed: int = 0  # engine tokens seen (usage counts all of them, EOS included)
    hit_stop: bool = False
    finish_reason: str | None = None
    sent_chars: int = 0
    sent_tokens: int = 0
    finish_sent: bool = False

    @property
    def done(self) -> bool:
        return self.hit_stop or self.finish_reason is not None

    def push(self, token: int, logprob: float, top: list[tuple[int, float]] | None = None) -> None:
        self.pushed += 1
        if self.done or token in self.eos_ids:  # EOS ends the sample; it is not part of the text
            return
        start = len(self.text)
        self.text += self.detok.push(token)
        self.tokens.append(TokenOut(token, logprob, top, start, len(self.text)))
        self._cut_at_stop(start)

    def _cut_at_stop(self, new_from: int) -> None:
        if not self.stops or self.hit_stop:
            return
        longest = max(len(s) for s in self.stops)
        search_from = max(0, new_from - longest + 1)
        hits = [i for s in self.stops if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return
        cut = min(hits)
        self.text = self.text[:cut]
        self.tokens = [t for t in self.tokens if t.start < cut]
        for t in self.tokens:
            t.end = min(t.end, cut)
        self.hit_stop = True

    def finish(self, engine_reason: str) -> None:
        if not self.hit_stop:
            start = len(self.text)
            tail = self.detok.flush()
            if tail:
                self.text += tail
                if self.tokens:
                    self.tokens[-1].end = len(self.text)
                self._cut_at_stop(start)
        self.finish_reason = "stop" if self.hit_stop or engine_reason == "stop" else "length"

    def take(self) -> tuple[str, list[TokenOut], str | None]:
        """What is new since the last take: text, its tokens, and the finish reason once."""
        final = self.done
        limit = len(self.text) if final else len(self.text) - partial_stop_overlap(self.text, self.stops)
        limit = max(limit, self.sent_chars)
        text = self.text[self.sent_chars : limit]
        self.sent_chars = limit
        end = self.sent_tokens
        while end < len(self.tokens) and (final or self.tokens[end].end <= limit):
            end += 1
        tokens = self.tokens[self.sent_tokens : end]
        self.sent_tokens = end
        finish = None
        if self.finish_reason is not None and not self.finish_sent:
            finish, self.finish_sent = self.finish_reason, True
        return text, tokens, finish


# -- logprobs in OpenAI's two shapes ---------------------------------------------------------


def _finite(x: float | None) -> float | None:
    if x is None or math.isnan(x):
        return None
    return max(x, -9999.0)


class TokenNames:
    def __init__(self, tokenizer: Any, as_ids: bool):
        self._tokenizer = tokenizer
        self._as_ids = as_ids

    def __call__(self, token: int) -> str:
        if self._as_ids:
            return f"token_id:{token}"
        return self._tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(tokens: list[TokenOut], names: TokenNames, offset: int = 0) -> dict:
    """The legacy shape: parallel lists; top_logprobs always include the sampled token."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        name = names(t.token)
        out["tokens"].append(name)
        out["token_logprobs"].append(_finite(t.logprob))
        out["text_offset"].append(offset + t.start)
        if t.top is None and t.logprob is None:
            out["top_logprobs"].append(None)
            continue
        top = {names(tok): _finite(lp) for tok, lp in (t.top or [])}
        top.setdefault(name, _finite(t.logprob))
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokens: list[TokenOut], names: TokenNames) -> list[dict]:
    def entry(token: int, logprob: float) -> dict:
        name = names(token)
        return {"token": name, "logprob": _finite(logprob), "bytes": list(name.encode("utf-8"))}

    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(tok, lp) for tok, lp in (t.top or [])]} for t in tokens]


def top_alternatives(result_seq: Any, j: int) -> list[tuple[int, float]] | None:
    if result_seq.topk_ids is None:
        return None
    return list(zip(result_seq.topk_ids[j], result_seq.topk_logprobs[j], strict=True))


def prompt_logprobs(result: SampleResult | None, prompt: list[int], tokenizer: Any, names: TokenNames) -> dict:
    """Logprobs of the prompt's own tokens for echo (the first token has none)."""
    assert result is not None
    detok = Detokenizer(tokenizer, [], skip_special_tokens=False)
    tokens: list[TokenOut] = []
    offset = 0
    scores = result.prompt_logprobs or [float("nan")] * len(prompt)
    for j, token in enumerate(prompt):
        piece = detok.push(token) + (detok.flush() if j == len(prompt) - 1 else "")
        top = None
        if result.topk_prompt_ids is not None and j > 0:
            top = list(zip(result.topk_prompt_ids[j], result.topk_prompt_logprobs[j], strict=True))
        tokens.append(TokenOut(token, scores[j], top, offset, offset + len(piece)))
        offset += len(piece)
    out = completion_logprobs(tokens, names)
    out["token_logprobs"][0] = None
    out["top_logprobs"][0] = None
    return out


def merge_logprobs(first: dict, second: dict) -> dict:
    return {k: first[k] + second[k] for k in first}


# -- server-sent events ----------------------------------------------------------------------


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, allow_nan=False)}\n\n"
