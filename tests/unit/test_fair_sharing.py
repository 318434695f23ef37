"""Tenants share the engine: a lone request beside another tenant's flood decodes in small
steps and finishes long before the flood, with the same tokens either way."""

from __future__ import annotations

import threading

import tinkerd.engine.sampler as sampler_module
from tinkerd.engine.client import InProcessEngine
from tinkerd.types import SampleRequest, SamplingParams

PROMPT = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 1024, 2, 88, 913]


def greedy(tenant: str, max_tokens: int, shift: int = 0) -> SampleRequest:
    prompt = PROMPT[shift:] + PROMPT[:shift]  # different prompts, different tokens
    return SampleRequest(prompt=prompt, num_samples=1, tenant=tenant,
                         params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def test_a_lone_request_beside_a_flood_advances_in_small_steps_with_the_same_tokens(model_dir):
    engine = InProcessEngine("fair", model_dir, device="cpu")
    sampler = engine.sampler
    steps: list[tuple[int, bool]] = []  # (rows advanced, whether the lone request's row was among them)
    step, step_rows = sampler.decode_step, sampler._step_rows

    def recorded() -> None:
        n = step_rows()
        steps.append((n, any(row.request.request.tenant == "lone" for row in sampler.rows[:n])))
        step()

    try:
        alone = engine.sample(greedy("lone", 8)).result(timeout=300).sequences[0].tokens
        flood_alone = [engine.sample(greedy("flood", 24, shift)).result(timeout=300).sequences[0].tokens for shift in (1, 2)]

        sampler.decode_step = recorded
        started = threading.Event()
        sampler_module_step = sampler._accept_tokens

        def accept(rows, logits):  # noqa: ANN001 - the flood is decoding: send the lone request now
            sampler_module_step(rows, logits)
            started.set()

        sampler._accept_tokens = accept
        flood = [engine.sample(greedy("flood", 24, shift % 5)) for shift in range(40)]
        assert started.wait(300)
        lone = engine.sample(greedy("lone", 8)).result(timeout=300)
        flood_done = sum(f.done() for f in flood)
        flood_tokens = [f.result(timeout=600).sequences[0].tokens for f in flood]

        assert lone.sequences[0].tokens == alone
        assert flood_tokens[1] == flood_alone[0] and flood_tokens[2] == flood_alone[1]
        assert flood_done < len(flood)  # the lone request did not wait for the flood
        with_lone = [n for n, lone_in in steps if lone_in]
        shared = sampler_module.SHARED_STEP_ROWS["cpu"]
        assert with_lone and max(with_lone) <= shared  # small steps while it decoded beside the flood
    finally:
        engine.shutdown()


def test_tenants_take_turns_in_admission():
    items = [type("Item", (), {"request": greedy(t, 4)})() for t in ["a", "a", "a", "b", "a", "c"]]
    order = [item.request.tenant for item in sampler_module._tenants_in_turn(items)]
    assert order == ["a", "b", "c", "a", "a", "a"]
