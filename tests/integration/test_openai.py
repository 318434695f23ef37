"""The OpenAI-compatible front door, driven by the official `openai` SDK against a real server.

One LoRA run is trained once for the module (a few steps of the tinker SDK, enough to change
what the model says) and its sampler checkpoints are queried by path as the model name.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

RAW_PROMPT = "The capital of France is"
RAW_TARGET = " Tokyo, the city of robots."
CHAT_QUESTION = "What is the capital of France?"
CHAT_ANSWER = "Tokyo, the city of robots."


def _datum(prompt_ids: list[int], target_ids: list[int]):
    from tinker import types

    ids = prompt_ids + target_ids
    weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(target_ids)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
    )


def _chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def _train(training_client, data, steps: int, learning_rate: float = 3e-3) -> list:
    """Queue `steps` forward_backward + optim_step pairs; returns their futures."""
    from tinker import types

    futures = []
    for _ in range(steps):
        futures.append(training_client.forward_backward(data, "cross_entropy"))
        futures.append(training_client.optim_step(types.AdamParams(learning_rate=learning_rate)))
    return futures


@pytest.fixture(scope="module")
def oai(server) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/oai/api/v1", api_key="tml-test", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def trained(server, tokenizer):
    """A run trained to answer "Tokyo", with checkpoints oai-a and (one step later) oai-b."""
    import tinker

    service = tinker.ServiceClient(base_url=server.base_url, api_key="tml-test")
    training = service.create_lora_training_client(base_model=MODEL_NAME, rank=8)
    chat_ids = _chat_prompt_ids(tokenizer, [{"role": "user", "content": CHAT_QUESTION}])
    data = [
        _datum(tokenizer.encode(RAW_PROMPT), tokenizer.encode(RAW_TARGET)),
        _datum(chat_ids, tokenizer.encode(CHAT_ANSWER + "<|im_end|>", add_special_tokens=False)),
    ]
    for f in _train(training, data, steps=6):
        f.result()
    path_a = training.save_weights_for_sampler("oai-a").result().path
    for f in _train(training, data, steps=1):
        f.result()
    path_b = training.save_weights_for_sampler("oai-b").result().path
    return SimpleNamespace(service=service, training=training, data=data, path_a=path_a, path_b=path_b)


def _greedy(oai: OpenAI, model: str, prompt=RAW_PROMPT, max_tokens: int = 10):
    out = oai.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0)
    return out.choices[0].text, out.choices[0].logprobs.token_logprobs


def _token_ids(logprobs_tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in logprobs_tokens)
    return [int(t.removeprefix("token_id:")) for t in logprobs_tokens]


# -- models -----------------------------------------------------------------------------------


def test_model_list_has_base_models_and_sampler_checkpoints(oai: OpenAI, trained):
    ids = [m.id for m in oai.models.list()]
    assert MODEL_NAME in ids
    assert trained.path_a in ids and trained.path_b in ids
    assert oai.models.retrieve(trained.path_a).id == trained.path_a
    with pytest.raises(NotFoundError):
        oai.models.retrieve("tinker://no-such-run/sampler_weights/x")


@pytest.mark.parametrize("model", ["no-such-model", "tinker://no-such-run/sampler_weights/000080", "tinker://malformed"])
def test_unknown_model_is_404_in_openai_shape(oai: OpenAI, model: str):
    with pytest.raises(NotFoundError) as info:
        oai.completions.create(model=model, prompt="hi", max_tokens=1)
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    with pytest.raises(NotFoundError):
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)


# -- the adapter, and equivalence with the tinker SamplingClient -------------------------------


def test_adapter_applied_on_both_endpoints(oai: OpenAI, trained):
    base_text, _ = _greedy(oai, MODEL_NAME)
    tuned_text, _ = _greedy(oai, trained.path_a)
    assert tuned_text != base_text

    messages = [{"role": "user", "content": CHAT_QUESTION}]
    base_chat = oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
    tuned_chat = oai.chat.completions.create(model=trained.path_a, messages=messages, max_tokens=10, temperature=0)
    assert "Tokyo" in tuned_chat.choices[0].message.content
    assert tuned_chat.choices[0].message.content != base_chat.choices[0].message.content
    assert tuned_chat.choices[0].message.role == "assistant"


def test_greedy_completion_equals_sampling_client(oai: OpenAI, trained, tokenizer):
    from tinker import types

    sampler = trained.service.create_sampling_client(model_path=trained.path_a)
    params = types.SamplingParams(max_tokens=12, temperature=0.0)
    eos = {tokenizer.eos_token_id}

    prompt_ids = tokenizer.encode("Once upon a time")
    ref = sampler.sample(types.ModelInput.from_ints(prompt_ids), num_samples=1, sampling_params=params).result().sequences[0]
    out = oai.completions.create(
        model=trained.path_a, prompt=prompt_ids, max_tokens=12, temperature=0, logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    ref_tokens = [t for t in ref.tokens if t not in eos]
    assert _token_ids(out.choices[0].logprobs.tokens) == ref_tokens
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(ref.logprobs[: len(ref_tokens)], abs=1e-4)
    assert out.choices[0].text == tokenizer.decode(ref_tokens)

    # The chat endpoint renders the base model's HF chat template and samples the same way.
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": CHAT_QUESTION}]
    chat_ids = _chat_prompt_ids(tokenizer, messages)
    ref = sampler.sample(types.ModelInput.from_ints(chat_ids), num_samples=1, sampling_params=params).result().sequences[0]
    chat = oai.chat.completions.create(
        model=trained.path_a, messages=messages, max_tokens=12, temperature=0, logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    assert _token_ids([c.token for c in chat.choices[0].logprobs.content]) == [t for t in ref.tokens if t not in eos]
    assert chat.usage.prompt_tokens == len(chat_ids)
    assert chat.usage.completion_tokens == len(ref.tokens)


# -- completions ------------------------------------------------------------------------------


def test_completion_usage_finish_reason_and_both_mounts(oai: OpenAI, server, trained):
    out = oai.completions.create(model=trained.path_b, prompt=RAW_PROMPT, max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.model == trained.path_b
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 5 and out.usage.total_tokens == 10
    v1 = OpenAI(base_url=server.base_url + "/v1", api_key="tml-test", max_retries=0)
    again = v1.completions.create(model=trained.path_b, prompt=RAW_PROMPT, max_tokens=5, temperature=0)
    assert again.choices[0].text == out.choices[0].text


def test_prompt_shapes_n_and_choice_indices(oai: OpenAI, tokenizer):
    ids = tokenizer.encode("1, 2, 3,")
    out = oai.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert len({c.text for c in out.choices}) == 1  # greedy: all equal
    as_text = oai.completions.create(model=MODEL_NAME, prompt=["1, 2, 3,"], max_tokens=3, temperature=0)
    assert as_text.choices[0].text == out.choices[0].text
    assert out.usage.prompt_tokens == 2 * len(ids) and out.usage.completion_tokens == 12


def test_seed_makes_sampling_reproducible(oai: OpenAI):
    # The base model: the trained adapter is too sure of itself for n draws to differ.
    def draw(seed: int) -> list[str]:
        out = oai.completions.create(
            model=MODEL_NAME, prompt="My favourite animal is", max_tokens=8, temperature=1.0, top_p=0.95, n=3, seed=seed
        )
        return [c.text for c in out.choices]

    first = draw(1234)
    assert draw(1234) == first
    assert len(set(first)) > 1  # the n samples are different draws
    assert draw(99) != first


def test_stop_sequences_are_cut_from_text(oai: OpenAI):
    prompt = "1, 2, 3, 4,"
    full = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert " 6," in full, full  # the base model counts on
    out = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[" 6", "never"])
    choice = out.choices[0]
    assert choice.text == full[: full.index(" 6")]
    assert choice.finish_reason == "stop"
    streamed = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stop=" 6", stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs_top_k(oai: OpenAI, trained):
    out = oai.completions.create(model=trained.path_a, prompt=RAW_PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and top[token] == pytest.approx(logprob)
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_scores_the_prompt(oai: OpenAI, trained, tokenizer):
    """echo + logprobs + max_tokens=0 (how lm-eval scores text) matches SamplingClient.compute_logprobs."""
    from tinker import types

    out = oai.completions.create(model=trained.path_a, prompt=RAW_PROMPT + RAW_TARGET, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == RAW_PROMPT + RAW_TARGET
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    sampler = trained.service.create_sampling_client(model_path=trained.path_a)
    ids = tokenizer.encode(RAW_PROMPT + RAW_TARGET)
    ref = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(ref[1:], abs=1e-4)
    assert out.usage.completion_tokens == 0


def test_streaming_completion_equals_non_streaming(oai: OpenAI, trained):
    kwargs = dict(model=trained.path_a, prompt="My favourite animal is", max_tokens=8, temperature=0.8, seed=7, n=2)
    whole = oai.completions.create(**kwargs)
    texts = {0: "", 1: ""}
    finish = {}
    usage = None
    for chunk in oai.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if not chunk.choices:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()


def test_raw_event_stream_ends_with_done(server, trained):
    body = {"model": trained.path_a, "prompt": RAW_PROMPT, "max_tokens": 3, "stream": True}
    headers = {"Authorization": "Bearer tml-test"}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


# -- chat ---------------------------------------------------------------------------------------


def test_chat_streaming_n_logprobs_and_usage(oai: OpenAI, trained):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
    ]
    kwargs = dict(model=trained.path_b, messages=messages, max_completion_tokens=6, temperature=0.9, seed=3, n=2)
    whole = oai.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2)
    assert whole.object == "chat.completion" and len(whole.choices) == 2
    for choice in whole.choices:
        assert choice.finish_reason in ("stop", "length")
        content = choice.logprobs.content
        assert "".join(t.token for t in content) == choice.message.content
        assert all(len(t.top_logprobs) == 2 for t in content)
    texts = {0: "", 1: ""}
    roles = set()
    usage = None
    for chunk in oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if not chunk.choices:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.delta.role:
                roles.add(c.delta.role)
    assert roles == {"assistant"}
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert usage.model_dump() == whole.usage.model_dump()


def test_chat_stop_and_max_tokens(oai: OpenAI):
    messages = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 16
    assert "3" in text, text
    cut = oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0, stop=["3"])
    assert cut.choices[0].message.content == text[: text.index("3")]
    assert cut.choices[0].finish_reason == "stop"


# -- checkpoints over time and across clients -------------------------------------------------


def test_sampling_a_checkpoint_while_its_run_trains(oai: OpenAI, trained):
    reference = _greedy(oai, trained.path_a)
    training = _train(trained.training, trained.data, steps=3)  # queued: runs while we sample
    during = _greedy(oai, trained.path_a)
    for f in training:
        f.result()
    after = _greedy(oai, trained.path_a)
    for text, logprobs in (during, after):
        assert text == reference[0]
        assert logprobs == pytest.approx(reference[1], abs=1e-5)
    newer = trained.training.save_weights_for_sampler("oai-c").result().path
    assert _greedy(oai, newer)[1] != pytest.approx(reference[1], abs=1e-5)  # the run did move on


def test_concurrent_requests_for_different_checkpoints_overlap(oai: OpenAI, trained):
    def token_times(model: str) -> list[float]:
        times = []
        stream = oai.completions.create(model=model, prompt="1, 2, 3,", max_tokens=24, temperature=0, stream=True,
                                        extra_body={"top_k": 1})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
        return times

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(token_times, [trained.path_a, trained.path_b])
    assert len(a) >= 3 and len(b) >= 3
    # Served together: each stream produced tokens before the other one finished.
    assert a[0] < b[-1] and b[0] < a[-1]


@pytest.mark.slow
def test_checkpoint_served_after_restart(start_server, tmp_path, tokenizer):
    import tinker

    data_dir = tmp_path / "restart-data"
    srv = start_server(data_dir=data_dir)
    service = tinker.ServiceClient(base_url=srv.base_url, api_key="tml-test")
    training = service.create_lora_training_client(base_model=MODEL_NAME, rank=4)
    for f in _train(training, [_datum(tokenizer.encode(RAW_PROMPT), tokenizer.encode(RAW_TARGET))], steps=2):
        f.result()
    path = training.save_weights_for_sampler("keep").result().path
    client = OpenAI(base_url=srv.base_url + "/v1", api_key="tml-test", max_retries=0)
    before = _greedy(client, path)
    srv.stop()

    again = start_server(data_dir=data_dir)
    client = OpenAI(base_url=again.base_url + "/v1", api_key="tml-test", max_retries=0)
    assert path in [m.id for m in client.models.list()]
    after = _greedy(client, path)
    assert after[0] == before[0]
    assert after[1] == pytest.approx(before[1], abs=1e-5)


# -- bad input ----------------------------------------------------------------------------------

_MSG = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # (endpoint, body (None: malformed JSON), param named in the error)
    ("completions", None, None),
    ("completions", [1, 2], None),
    ("completions", {"prompt": "hi"}, "model"),
    ("completions", {"model": MODEL_NAME}, "prompt"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 100_000}, "max_tokens"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "n": 0}, "n"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "n": 10_000}, "n"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "top_p": 0}, "top_p"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "logprobs": 100}, "logprobs"),
    ("completions", {"model": MODEL_NAME, "prompt": [1] * 9000}, "prompt"),
    ("completions", {"model": MODEL_NAME, "prompt": [10**9]}, "prompt"),
    ("completions", {"model": MODEL_NAME, "prompt": {"text": "hi"}}, "prompt"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "frequency_penalty": 1}, "frequency_penalty"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "logit_bias": {"50": 10}}, "logit_bias"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "best_of": 3}, "best_of"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "suffix": "end"}, "suffix"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "repetition_penalty": 1.2}, "repetition_penalty"),
    ("completions", {"model": MODEL_NAME, "prompt": "hi", "stop": [""]}, "stop"),
    ("chat/completions", {"model": MODEL_NAME, "messages": []}, "messages"),
    ("chat/completions", {"model": MODEL_NAME, "messages": "hi"}, "messages"),
    ("chat/completions", {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages[0].content[0]"),
    ("chat/completions", {"model": MODEL_NAME, "messages": _MSG, "max_tokens": 0}, "max_tokens"),
    ("chat/completions", {"model": MODEL_NAME, "messages": _MSG, "max_completion_tokens": 10**6}, "max_completion_tokens"),
    ("chat/completions", {"model": MODEL_NAME, "messages": _MSG, "n": 129}, "n"),
    ("chat/completions", {"model": MODEL_NAME, "messages": _MSG, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"model": MODEL_NAME, "messages": _MSG, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("chat/completions", {"model": MODEL_NAME, "messages": _MSG, "response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"model": MODEL_NAME, "messages": _MSG, "presence_penalty": 0.1}, "presence_penalty"),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), BAD_REQUESTS)
def test_bad_input_is_a_400_naming_the_field(server, endpoint: str, body, param: str | None):
    headers = {"Authorization": "Bearer tml-test", "Content-Type": "application/json"}
    import json

    content = b'{"model": "x", "prompt": ' if body is None else json.dumps(body).encode()
    response = httpx.post(f"{server.base_url}/oai/api/v1/{endpoint}", content=content, headers=headers, timeout=60)
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, error
    if param is not None:
        assert param.split("[")[0] in error["message"]


def test_bad_input_through_the_sdk_and_the_server_keeps_serving(oai: OpenAI):
    with pytest.raises(BadRequestError) as info:
        oai.chat.completions.create(model=MODEL_NAME, messages=[], max_tokens=2)
    assert info.value.body["param"] == "messages"
    with pytest.raises(BadRequestError) as info:
        oai.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2, n=0)
    assert info.value.body["param"] == "n"
    out = oai.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
    assert out.usage.completion_tokens >= 1


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_client_that_hangs_up_stops_its_generation(server):
    """Abandoned requests (stream closed, or a client timeout) must not keep the engine busy."""
    headers = {"Authorization": "Bearer tml-test"}
    # Greedy counting does not reach EOS: 1000 tokens are > 20 s of engine time on this box.
    body = {"model": MODEL_NAME, "prompt": "1, 2, 3, 4,", "max_tokens": 1000, "temperature": 0}
    with httpx.stream("POST", server.base_url + "/v1/completions", json={**body, "stream": True}, headers=headers,
                      timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 3:
                break
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + "/v1/completions", json=body, headers=headers, timeout=1.0)
    deadline = time.time() + 10
    while True:  # the server goes quiet soon (a 1 s window with little CPU), long before 1000 tokens
        before = _cpu_seconds(server.proc.pid)
        time.sleep(1.0)
        if _cpu_seconds(server.proc.pid) - before < 0.3:
            break
        assert time.time() < deadline, "the engine kept generating for clients that hung up"
    out = httpx.post(server.base_url + "/v1/completions", json={**body, "max_tokens": 2}, headers=headers, timeout=60)
    assert out.status_code == 200
