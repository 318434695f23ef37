"""Tenants share the engine: a lone request beside another tenant's flood decodes in small
steps and finishes long before the flood, with the same tokens either way; training runs
take turns in the job queue, and a large training batch lets samples decode between its
passes."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest

import tinkerd.engine.sampler as sampler_module
import tinkerd.engine.scheduler as scheduler_module
from tinkerd.engine.client import InProcessEngine
from tinkerd.types import AdamParams, Datum, ForwardBackwardCall, LoraSpec, SampleRequest, SamplingParams

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


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = InProcessEngine("fair-train", model_dir, device="cpu")
    yield eng
    eng.shutdown()


def datums(n: int) -> list[Datum]:
    rows = [np.roll(np.array(PROMPT, dtype=np.int64), i) for i in range(n)]
    return [Datum(tokens=r[:-1], inputs={"target_tokens": r[1:], "weights": np.ones(len(r) - 1, np.float32)}) for r in rows]


def completion_order(futures: dict[str, Future]) -> list[str]:
    """The names of the futures in the order they finished (each must succeed)."""
    order: list[str] = []
    lock = threading.Lock()

    def done(name: str, future: Future) -> None:
        with lock:
            order.append(name)

    for name, future in futures.items():
        future.add_done_callback(lambda f, name=name: done(name, f))
    for future in futures.values():
        future.result(timeout=600)
    return order


def test_training_runs_take_turns_so_a_lone_step_does_not_wait_behind_a_long_queue(engine):
    for adapter in ("busy", "lone"):
        engine.create_adapter(adapter, LoraSpec(rank=4, seed=1)).result()
    engine.forward_backward(ForwardBackwardCall("lone", datums(1), "cross_entropy", {}, False)).result()
    gate = threading.Event()
    held = engine.run_on_engine_thread(gate.wait, 60)  # queue everything before the engine looks
    futures = {f"busy-{i}": engine.forward_backward(ForwardBackwardCall("busy", datums(2), "cross_entropy", {}, False))
               for i in range(6)}
    futures["lone"] = engine.optim_step("lone", AdamParams(learning_rate=1e-4))
    gate.set()
    held.result(timeout=60)
    order = completion_order(futures)
    # Queued after all six of busy's calls, the lone run's step runs after the first of them.
    assert order.index("lone") <= 1, order
    assert [name for name in order if name != "lone"] == [f"busy-{i}" for i in range(6)]  # each run keeps its order


def test_samples_decode_between_the_passes_of_a_large_training_batch(engine):
    engine.create_adapter("large", LoraSpec(rank=4, seed=2)).result()
    trainer = engine.trainer
    budget, passes = trainer.train_pass_tokens, trainer.stats["forward_backward_passes"]
    alone = engine.sample(greedy("lone", 4)).result(timeout=300).sequences[0].tokens
    started = threading.Event()
    run_pass = trainer._pass

    def recorded_pass(*args):  # noqa: ANN002 - the batch is training: send the sample now
        run_pass(*args)
        started.set()

    trainer._pass = recorded_pass
    try:
        trainer.train_pass_tokens = 24  # two datums of 12 tokens a pass: 20 passes (one datum while sampling goes on)
        training = engine.forward_backward(ForwardBackwardCall("large", datums(40), "cross_entropy", {}, False))
        assert started.wait(300)
        sample = engine.sample(greedy("lone", 4))
        order = completion_order({"training": training, "sample": sample})
    finally:
        trainer.train_pass_tokens = budget
        trainer._pass = run_pass
    assert 20 <= trainer.stats["forward_backward_passes"] - passes <= 40
    assert order == ["sample", "training"]
    assert sample.result().sequences[0].tokens == alone
    assert len(training.result().outputs) == 40


def test_training_passes_are_smaller_while_sampling_goes_on(engine, monkeypatch):
    """A request that arrives during a pass waits for that pass: while someone samples, a pass
    is a quarter of its usual size; with nobody sampling, passes are full size again."""
    engine.create_adapter("sized", LoraSpec(rank=4, seed=3)).result()
    trainer = engine.trainer
    budget = trainer.train_pass_tokens
    call = ForwardBackwardCall("sized", datums(16), "cross_entropy", {}, False)
    trainer.train_pass_tokens = 48  # four datums of 12 tokens a pass; one while sampling goes on

    def passes_of_one_call() -> int:
        before = trainer.stats["forward_backward_passes"]
        engine.forward_backward(call).result(timeout=300)
        return trainer.stats["forward_backward_passes"] - before

    try:
        monkeypatch.setattr(scheduler_module, "SAMPLING_RECENT_S", 3600.0)  # however slow the machine, "recent"
        engine.sample(greedy("poke", 2)).result(timeout=300)
        assert passes_of_one_call() == 16  # sampled recently: one datum a pass
        monkeypatch.setattr(scheduler_module, "SAMPLING_RECENT_S", 0.0)
        assert passes_of_one_call() == 4  # nobody sampling: full passes
    finally:
        trainer.train_pass_tokens = budget
