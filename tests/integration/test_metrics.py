"""GET /metrics, scraped with Prometheus' own text parser: the counters move by exactly what
known requests through the unmodified SDK did, and no label names a run, session or request."""

from __future__ import annotations

import httpx
import tinker
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def scrape(server) -> dict[tuple[str, tuple], float]:  # noqa: ANN001
    """Every sample as {(name, sorted labels): value}."""
    response = httpx.get(server.base_url + "/metrics", timeout=30)  # no API key: scrapers send none
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_engine_counters_move_by_what_the_requests_did(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.base_url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=1)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    datums = [types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                          loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})] * 2
    tc.forward_backward(datums, "cross_entropy").result()  # warm: the run exists before the first scrape
    model = {"base_model": BASE}

    before = scrape(server)
    tc.forward_backward(datums, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    path = tc.save_weights_for_sampler("metrics").result().path
    sampler = sc.create_sampling_client(model_path=path)
    prompt = tokenizer.encode("Once upon a time")
    result = sampler.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=6, temperature=0.0)).result()
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("tinkerd_engine_tokens_total", **model, kind="train") == 2 * (len(ids) - 1)
    assert delta("tinkerd_engine_tokens_total", **model, kind="prefill") == len(prompt)
    assert delta("tinkerd_engine_tokens_total", **model, kind="decode") == len(result.sequences[0].tokens)
    assert delta("tinkerd_engine_decode_steps_total", **model) == len(result.sequences[0].tokens) - 1  # the first comes from prefill
    assert delta("tinkerd_engine_forward_backward_seconds_count", **model) == 1
    assert delta("tinkerd_engine_optim_step_seconds_count", **model) == 1
    assert delta("tinkerd_engine_time_to_first_token_seconds_count", **model) == 1
    assert delta("tinkerd_engine_adapter_cache_total", **model, result="hit") == 1  # the saved weights serve at once
    assert delta("tinkerd_checkpoints", kind="sampler_weights") == 1
    assert delta("tinkerd_checkpoint_bytes", kind="sampler_weights") > 0
    assert delta("tinkerd_http_requests_total", route="/api/v1/optim_step", method="POST", status="200") == 1
    assert value(after, "tinkerd_engine_adapters", **model, kind="trainable") >= 1
    assert value(after, "tinkerd_data_dir_disk_bytes", state="free") > 0
    assert value(after, "tinkerd_engine_memory_bytes", **model, device="cpu") > 0

    run_id = tc.model_id
    for (name, labels), _ in after.items():
        for _, label in labels:
            assert run_id not in label and "req-" not in label and not label.startswith("tml-"), (name, labels)


def test_refused_requests_are_counted_by_route_and_status(server):
    before = scrape(server)
    assert httpx.get(server.base_url + "/api/v1/training_runs", timeout=10).status_code == 401  # no key
    after = scrape(server)
    labels = {"route": "unmatched", "method": "GET", "status": "401"}
    assert value(after, "tinkerd_http_requests_total", **labels) - value(before, "tinkerd_http_requests_total", **labels) == 1
