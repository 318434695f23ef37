"""The router over a model's replicas (engine/replicas.py): where each kind of request goes."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from tinkerd.engine.client import EngineClient
from tinkerd.engine.replicas import ReplicaRouter, merge_stats, stable_replica
from tinkerd.types import (
    AdamParams,
    AdapterRef,
    EngineStats,
    ForwardBackwardCall,
    LatencyHistogram,
    LoraSpec,
    ModelInfo,
    SampleRequest,
    SamplingParams,
    UserError,
)

INFO = ModelInfo(name="m", model_dir="/models/m", max_context=64, vocab_size=100, eos_token_ids=(2,))


class Replica(EngineClient):
    """Records each request it gets; its futures complete when the test says so."""

    def __init__(self, index: int):
        self.index = index
        self.info = INFO
        self.calls: list[tuple] = []
        self.pending: list[Future] = []
        self.fail_next = False

    def _record(self, *call) -> Future:
        self.calls.append(call)
        future: Future = Future()
        if self.fail_next:
            self.fail_next = False
            future.set_exception(UserError("refused"))
        else:
            self.pending.append(future)
        return future

    def finish_all(self) -> None:
        for future in self.pending:
            future.set_result(None)
        self.pending.clear()

    def create_adapter(self, adapter_id, spec):
        return self._record("create", adapter_id)

    def load_adapter(self, adapter_id, directory, with_optimizer):
        return self._record("load", adapter_id)

    def drop_adapter(self, adapter_id):
        return self._record("drop", adapter_id)

    def forward_backward(self, call):
        return self._record("fwdbwd", call.adapter_id)

    def optim_step(self, adapter_id, params):
        return self._record("optim", adapter_id)

    def save_adapter(self, adapter_id, directory, with_optimizer, sampler_key=None):
        return self._record("save", adapter_id)

    def publish_inflight(self, adapter_id, ref):
        return self._record("publish", adapter_id)

    def sample(self, request, on_token=None):
        return self._record("sample", request.request_id)

    def cancel(self, request_id, sample_index=None):
        self.calls.append(("cancel", request_id))

    def shutdown(self):
        pass

    def stats(self):
        return EngineStats("cpu", "float32", self.index, 0, 1, 2, 3, 100, {"decode_steps": 10 + self.index},
                           {"decode_step": LatencyHistogram((0.1,), (1, self.index), 0.5)})


def request(request_id: str, checkpoint: str | None = None) -> SampleRequest:
    adapter = AdapterRef(checkpoint, f"/data/{checkpoint}") if checkpoint else None
    return SampleRequest([1, 2, 3], 1, SamplingParams(max_tokens=4), adapter=adapter, request_id=request_id)


@pytest.fixture
def replicas() -> list[Replica]:
    return [Replica(i) for i in range(3)]


def kinds_on(replica: Replica, adapter_id: str) -> list[str]:
    return [call[0] for call in replica.calls if call[1] == adapter_id]


def test_a_runs_training_requests_all_reach_the_replica_that_holds_its_adapter(replicas):
    router = ReplicaRouter(replicas)
    for run in ("run-a", "run-b", "run-c", "run-d"):
        router.create_adapter(run, LoraSpec(rank=4))
    # New adapters are spread over the replicas, the one holding fewest first.
    assert [len(r.calls) for r in replicas] == [2, 1, 1]
    holder = router.holder("run-d")
    for _ in range(3):
        router.forward_backward(ForwardBackwardCall("run-d", [], "cross_entropy", {}, False))
        router.optim_step("run-d", AdamParams())
    router.save_adapter("run-d", "/data/ckpt", True)
    router.load_adapter("run-d", "/data/ckpt", True)  # loaded again: stays where it is
    assert kinds_on(replicas[holder], "run-d") == ["create"] + ["fwdbwd", "optim"] * 3 + ["save", "load"]
    assert all(kinds_on(r, "run-d") == [] for r in replicas if r.index != holder)


def test_an_adapter_that_failed_to_be_created_is_not_routed_to_again(replicas):
    router = ReplicaRouter(replicas)
    replicas[0].fail_next = True
    assert isinstance(router.create_adapter("run-a", LoraSpec(rank=4)).exception(), UserError)
    with pytest.raises(UserError, match="not loaded"):
        router.optim_step("run-a", AdamParams())
    router.drop_adapter("run-b").result()  # never created: nothing to free, no replica asked
    assert all(call[0] != "drop" for r in replicas for call in r.calls)


def test_a_checkpoint_is_sampled_on_the_replica_its_key_hashes_to(replicas):
    router = ReplicaRouter(replicas)
    keys = [f"tinker://run-{i}/sampler_weights/final@{i:04x}" for i in range(12)]
    for i, key in enumerate(keys):
        router.sample(request(f"r{i}", key))
        router.sample(request(f"again{i}", key))
    for i, key in enumerate(keys):
        expected = replicas[stable_replica(key, 3)]
        assert ("sample", f"r{i}") in expected.calls and ("sample", f"again{i}") in expected.calls
    assert len({stable_replica(key, 3) for key in keys}) == 3  # twelve checkpoints use every replica
    assert stable_replica("tinker://run-1/sampler_weights/final@0001", 3) == 0  # the same in every process


def test_in_flight_weights_are_published_and_sampled_where_their_run_is_trained(replicas):
    router = ReplicaRouter(replicas)
    for run in ("run-a", "run-b", "run-c"):
        router.create_adapter(run, LoraSpec(rank=4))
    holder = router.holder("run-c")
    router.publish_inflight("run-c", AdapterRef("inflight:run-c#1", "", inflight_of="run-c", version=1))
    for version in (1, 2, 3):  # whatever the version's key hashes to
        ref = AdapterRef(f"inflight:run-c#{version}", "", inflight_of="run-c", version=version)
        router.sample(SampleRequest([1, 2], 1, SamplingParams(max_tokens=4), adapter=ref, request_id=f"v{version}"))
    assert [call[0] for call in replicas[holder].calls][-4:] == ["publish", "sample", "sample", "sample"]
    assert all(call[0] not in ("publish", "sample") for r in replicas if r.index != holder for call in r.calls)
    router.drop_adapter("run-c")  # its session ended: its in-flight weights went with it
    gone = router.sample(SampleRequest([1, 2], 1, SamplingParams(max_tokens=4), request_id="late",
                                       adapter=AdapterRef("inflight:run-c#3", "", inflight_of="run-c", version=3)))
    assert isinstance(gone.exception(), UserError)


def test_base_model_samples_go_to_the_least_loaded_replica_and_cancel_follows_them(replicas):
    router = ReplicaRouter(replicas)
    for i in range(6):
        router.sample(request(f"r{i}"))
    assert [len(r.calls) for r in replicas] == [2, 2, 2]
    replicas[1].finish_all()  # replica 1's requests are done: it is the least loaded now
    router.sample(request("next"))
    assert replicas[1].calls[-1] == ("sample", "next")
    router.cancel("next")
    assert replicas[1].calls[-1] == ("cancel", "next")
    router.cancel("r1")  # finished: nothing to cancel anywhere
    assert all(call != ("cancel", "r1") for r in replicas for call in r.calls)


def test_stats_of_the_replicas_add_up(replicas):
    merged = merge_stats([r.stats() for r in replicas])
    assert merged.queued_jobs == 0 + 1 + 2
    assert merged.memory_bytes == 300 and merged.adapters_cached == 9
    assert merged.counters == {"decode_steps": 33}
    assert merged.latencies["decode_step"].counts == (3, 3)
    assert merged.latencies["decode_step"].total_seconds == pytest.approx(1.5)
    assert ReplicaRouter(replicas).stats() == merged
