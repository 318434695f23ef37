"""Restart safety: the server process is really killed (SIGKILL) and started again.

Everything acknowledged must survive; what was in flight must fail cleanly; checkpoint
files must never be listed half-written; bad files and full disks give clear errors; and
concurrent sessions never see each other's state.
"""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEXTS = ["Q: What is the capital of France?\nA: Paris.", "Q: How many legs does a spider have?\nA: Eight."]


def sft_datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )


def metrics_of(base_url: str, run_id: str) -> list[dict]:
    resp = httpx.get(f"{base_url}/api/v1/training_runs/{run_id}/metrics", headers={"X-API-Key": "tml-test"}, timeout=30)
    resp.raise_for_status()
    return resp.json()["metrics"]


def train_step(tc, data, lr: float = 5e-3) -> float:
    loss = tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    tc.optim_step(types.AdamParams(learning_rate=lr)).result()
    return loss


def checkpoint_dir(data_dir: Path, tinker_path: str) -> Path:
    run, kind, name = tinker_path.removeprefix("tinker://").split("/")
    (directory,) = (data_dir / "checkpoints" / run / kind).glob(f"{name}@*")
    return directory


@pytest.fixture(scope="module")
def restarted(model_dir, tmp_path_factory, tokenizer):
    """Train, save, sample, start a long request; kill -9 the server; start it again."""
    from tinkerd_testing import Server

    srv = Server(model_dir, tmp_path_factory.mktemp("restart") / "data").start()
    try:
        sc = tinker.ServiceClient(base_url=srv.base_url)
        tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=11, user_metadata={"experiment": "restart"})
        run_id = tc.get_info().model_id
        data = [sft_datum(tokenizer, t) for t in TEXTS]
        first_losses = [train_step(tc, data) for _ in range(2)]
        state = tc.save_state("step2", user_metadata={"note": "after two steps"}).result().path
        sampler_path = tc.save_weights_for_sampler("step2", ttl_seconds=86400).result().path
        continued_losses = [train_step(tc, data) for _ in range(2)]
        victims = {
            "sampler": tc.save_weights_for_sampler("victim").result().path,
            "state": tc.save_state("victim").result().path,
            "state2": tc.save_state("victim2").result().path,
        }
        prompt = types.ModelInput.from_ints(tokenizer.encode("Q: What is the capital of France?\nA:"))
        params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=42)
        sampler = sc.create_sampling_client(model_path=sampler_path).result()
        sample_before = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
        rc = tinker.RestClient(base_url=srv.base_url)
        run_before = rc.get_training_run(run_id).result()
        checkpoints_before = rc.list_checkpoints(run_id).result().checkpoints
        metrics_before = metrics_of(srv.base_url, run_id)

        # A long request in flight when the process dies (stop=[]: no EOS, runs for minutes).
        in_flight = sampler.sample(prompt, num_samples=1, sampling_params=types.SamplingParams(max_tokens=4000, stop=[], seed=1))
        time.sleep(2.0)
        assert not in_flight.done()
        srv.kill9()
        killed_at = time.time()
        srv.start()
        yield {
            "srv": srv, "run_id": run_id, "data": data, "first_losses": first_losses, "continued_losses": continued_losses,
            "state": state, "sampler_path": sampler_path, "victims": victims, "prompt": prompt, "params": params,
            "sample_before": sample_before, "run_before": run_before, "checkpoints_before": checkpoints_before,
            "metrics_before": metrics_before, "in_flight": in_flight, "killed_at": killed_at,
        }
    finally:
        srv.stop()


def test_runs_checkpoints_and_their_metadata_survive_kill9(restarted):
    rc = tinker.RestClient(base_url=restarted["srv"].base_url)
    run = rc.get_training_run(restarted["run_id"]).result()
    assert run == restarted["run_before"]
    assert run.user_metadata == {"experiment": "restart"} and run.lora_rank == 4
    after = sorted(rc.list_checkpoints(restarted["run_id"]).result().checkpoints, key=lambda c: c.tinker_path)
    assert after == sorted(restarted["checkpoints_before"], key=lambda c: c.tinker_path)
    by_path = {c.tinker_path: c for c in after}
    assert by_path[restarted["state"]].user_metadata == {"note": "after two steps"}
    assert by_path[restarted["sampler_path"]].expires_at is not None


def test_metric_history_survives_kill9(restarted):
    after = metrics_of(restarted["srv"].base_url, restarted["run_id"])
    assert after == restarted["metrics_before"]
    losses = [m["value"] for m in after if m["kind"] == "forward_backward" and m["key"] == "loss:sum"]
    assert losses == pytest.approx(restarted["first_losses"] + restarted["continued_losses"], rel=1e-6)


def test_sampler_checkpoint_samples_identically_after_restart(restarted):
    sc = tinker.ServiceClient(base_url=restarted["srv"].base_url)
    sampler = sc.create_sampling_client(model_path=restarted["sampler_path"]).result()
    after = sampler.sample(restarted["prompt"], num_samples=2, sampling_params=restarted["params"]).result()
    before = restarted["sample_before"]
    assert [s.tokens for s in after.sequences] == [s.tokens for s in before.sequences]
    for a, b in zip(after.sequences, before.sequences, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_training_resumes_with_optimizer_state_after_restart(restarted):
    sc = tinker.ServiceClient(base_url=restarted["srv"].base_url)
    tc = sc.create_training_client_from_state_with_optimizer(restarted["state"]).result()
    resumed = [train_step(tc, restarted["data"]) for _ in range(2)]
    # same weights and Adam moments as before the crash → the same next two steps
    assert resumed == pytest.approx(restarted["continued_losses"], rel=1e-4)


def test_request_in_flight_fails_cleanly_and_a_new_session_works(restarted):
    # The SDK's batched polling (retrieve_futures) asks after the sampler, which died with the
    # process: the server says so, and the SDK fails the waiting sample with that message.
    with pytest.raises(tinker.TinkerError) as failure:
        restarted["in_flight"].result(timeout=180)
    assert "server restarted" in str(failure.value)
    assert time.time() - restarted["killed_at"] < 180
    sc = tinker.ServiceClient(base_url=restarted["srv"].base_url)
    sampler = sc.create_sampling_client(base_model=BASE)
    assert sampler.sample(restarted["prompt"], num_samples=1, sampling_params=types.SamplingParams(max_tokens=2, seed=3)).result().sequences


def test_corrupt_or_missing_checkpoint_files_give_a_clear_error(restarted):
    data_dir, victims = restarted["srv"].data_dir, restarted["victims"]
    sc = tinker.ServiceClient(base_url=restarted["srv"].base_url)

    adapter = checkpoint_dir(data_dir, victims["sampler"]) / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])  # truncated
    with pytest.raises(tinker.BadRequestError) as err:
        sc.create_sampling_client(model_path=victims["sampler"]).result()
    assert victims["sampler"] in str(err.value) and "damaged" in str(err.value)

    (checkpoint_dir(data_dir, victims["state"]) / "optimizer.safetensors").unlink()
    with pytest.raises(tinker.NotFoundError) as err:
        sc.create_training_client_from_state_with_optimizer(victims["state"]).result()
    assert victims["state"] in str(err.value) and "optimizer.safetensors" in str(err.value)

    config = checkpoint_dir(data_dir, victims["state2"]) / "adapter_config.json"
    config.write_text("{not json")
    with pytest.raises(tinker.BadRequestError) as err:
        sc.create_training_client_from_state(victims["state2"]).result()
    assert victims["state2"] in str(err.value)

    # nothing else is affected: the listing, the other checkpoints, the server
    rc = tinker.RestClient(base_url=restarted["srv"].base_url)
    assert set(victims.values()) <= {c.tinker_path for c in rc.list_checkpoints(restarted["run_id"]).result().checkpoints}
    sampler = sc.create_sampling_client(model_path=restarted["sampler_path"]).result()
    assert sampler.sample(restarted["prompt"], num_samples=1, sampling_params=restarted["params"]).result().sequences
    sc.create_training_client_from_state_with_optimizer(restarted["state"]).result()


def test_full_disk_fails_the_save_with_a_clear_error(restarted, tokenizer):
    srv = restarted["srv"]
    sc = tinker.ServiceClient(base_url=srv.base_url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=8, seed=1)
    train_step(tc, restarted["data"])
    run_id = tc.get_info().model_id
    # The server may write no file past 8 MB: a rank-8 adapter (~12 MB) no longer fits,
    # while SQLite's small writes still do. The kernel answers EFBIG, like ENOSPC mid-write.
    soft, hard = resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (8 * 2**20, hard))
    try:
        with pytest.raises(tinker.RequestFailedError) as err:
            tc.save_state("too-big").result()
        assert "disk space" in str(err.value)
    finally:
        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
    rc = tinker.RestClient(base_url=srv.base_url)
    assert rc.list_checkpoints(run_id).result().checkpoints == []
    assert not list((srv.data_dir / "checkpoints").glob(f"{run_id}/*/*too-big*"))  # the partial write is gone
    train_step(tc, restarted["data"])  # the model is fine and the next save works
    assert tc.save_state("fits-now").result().path.endswith("/weights/fits-now")


def test_concurrent_sessions_never_see_each_others_state(restarted, tokenizer):
    base_url = restarted["srv"].base_url
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            sc = tinker.ServiceClient(base_url=base_url)
            tc = sc.create_lora_training_client(base_model=BASE, rank=2, seed=100 + i)
            datum = sft_datum(tokenizer, f"Q: Which number am I?\nA: I am number {i}, {'and proud ' * i}of it.")
            train_step(tc, [datum], lr=2e-2)
            state = tc.save_state("same-name").result().path  # identical names in every run
            sampler_path = tc.save_weights_for_sampler("same-name").result().path
            trainer_lps = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
            sampler = sc.create_sampling_client(model_path=sampler_path).result()
            ids = list(datum.model_input.to_ints()) + [int(datum.loss_fn_inputs["target_tokens"].tolist()[-1])]
            sampler_lps = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()[1:]
            results[i] = {"run": tc.get_info().model_id, "state": state, "sampler": sampler_path,
                          "trainer": trainer_lps, "sampler_lps": sampler_lps, "ids": ids}
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    rc = tinker.RestClient(base_url=base_url)
    assert len({r["run"] for r in results.values()}) == 3
    for r in results.values():
        # each sampler checkpoint holds exactly its own run's weights
        assert r["sampler_lps"] == pytest.approx(r["trainer"], abs=1e-4)
        listed = {c.tinker_path for c in rc.list_checkpoints(r["run"]).result().checkpoints}
        assert listed == {r["state"], r["sampler"]}


@pytest.mark.slow
def test_crash_mid_write_never_lists_an_unloadable_checkpoint(start_server, tokenizer):
    srv = start_server()
    sc = tinker.ServiceClient(base_url=srv.base_url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=16, seed=2)  # large files: a wide write window
    run_id = tc.get_info().model_id
    train_step(tc, [sft_datum(tokenizer, TEXTS[0])])
    acknowledged: list[str] = []
    stop = threading.Event()

    def keep_saving() -> None:
        i = 0
        try:
            while not stop.is_set():
                acknowledged.append(tc.save_state(f"s{i}").result().path)
                acknowledged.append(tc.save_weights_for_sampler(f"p{i}").result().path)
                i += 1
        except Exception:  # noqa: BLE001 - the server died under it: expected
            pass

    saver = threading.Thread(target=keep_saving, daemon=True)
    saver.start()
    deadline = time.time() + 120
    while len(acknowledged) < 4 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.13)  # land somewhere inside the next write
    srv.kill9()
    stop.set()
    # leftovers a crash can leave: a half-written temp dir and a renamed but unacknowledged dir
    weights = srv.data_dir / "checkpoints" / run_id / "weights"
    (weights / ".planted@dead.tmp-1").mkdir(parents=True, exist_ok=True)
    (weights / ".planted@dead.tmp-1" / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    (weights / "planted@deadbeef").mkdir()
    (weights / "planted@deadbeef" / "adapter_model.safetensors").write_bytes(b"\x01" * 100)
    srv.start()
    saver.join(timeout=300)

    rc = tinker.RestClient(base_url=srv.base_url)
    listed = [c.tinker_path for c in rc.list_checkpoints(run_id).result().checkpoints]
    assert set(acknowledged) <= set(listed)  # nothing acknowledged is lost
    sc2 = tinker.ServiceClient(base_url=srv.base_url)
    prompt = types.ModelInput.from_ints(tokenizer.encode("Hello"))
    for path in listed:  # every listed checkpoint loads
        if "/sampler_weights/" in path:
            assert sc2.create_sampling_client(model_path=path).result().compute_logprobs(prompt).result()
        else:
            sc2.create_training_client_from_state_with_optimizer(path).result()
    on_disk = sorted(p.name for p in (srv.data_dir / "checkpoints" / run_id).glob("*/*"))
    assert not [n for n in on_disk if "planted" in n or ".tmp-" in n], on_disk
    assert len(on_disk) == len(listed)  # and no unlisted files linger
