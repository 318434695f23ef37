"""A delivered result goes when its retention ends (core/futures.py), even though its sampler
or training model still remembers the request's seq_id to answer retries: a long session's
results must not pile up in memory until 4096 later requests push them out."""

from __future__ import annotations

import asyncio
import gc
import weakref

from tinkerd.core.access import LOCAL_USER
from tinkerd.core.futures import DELIVERED_RETENTION_S
from tinkerd.core.service import Service
from tinkerd.engine.client import InProcessEngine
from tinkerd.types import LoraSpec, SampleRequest, SamplingParams


def request(seed: int) -> SampleRequest:
    return SampleRequest(prompt=[1, 504, 3458], num_samples=1, params=SamplingParams(max_tokens=2, seed=seed))


async def retention_scenario(service: Service) -> None:
    service.start(asyncio.get_running_loop())
    session = service.create_session([], {}, LOCAL_USER)
    sampler_id = service.create_sampling_session(session, 0, "m", None, LOCAL_USER)
    samples = []
    for seq_id in (1, 2):
        entry, _ = service.sample(sampler_id, seq_id, request(seq_id), LOCAL_USER)
        assert await service.futures.wait(entry, 120)  # delivered: its retention starts
        samples.append(entry)
    _, created = service.create_model(session, 0, "m", LoraSpec(rank=2), {}, LOCAL_USER)
    assert await service.futures.wait(created, 120)

    # While kept, a retry of the same seq_id gets the same future: no second execution.
    assert service.sample(sampler_id, 1, request(1), LOCAL_USER)[0] is samples[0]

    kept = [weakref.ref(e) for e in [*samples, created]]
    for entry in [*samples, created]:
        entry.delivered_at -= DELIVERED_RETENTION_S + 1  # as if delivered past the retention
    assert service.futures.sweep() == 3
    del samples, created, entry
    gc.collect()
    assert [r() for r in kept] == [None, None, None]  # nothing else keeps the results alive
    await service.stop()


def test_results_go_after_their_retention_though_samplers_and_models_remember_their_seq_ids(model_dir, tmp_path):
    engine = InProcessEngine("m", model_dir, device="cpu")
    try:
        asyncio.run(retention_scenario(Service(tmp_path / "data", {"m": engine})))
    finally:
        engine.shutdown()
