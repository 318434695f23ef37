"""9. The Ray hop: the engine as a Ray actor (`tinkerd serve --ray`) against the engine in the
server's process, on this machine.

Two servers of the same model: the suite's usual one (engine in-process) and one whose
engine is a Ray actor on a local cluster this benchmark starts (`ray.init` with every usable
core, token authentication on, the actor given all of them). The same SDK load goes to each
in turn: N concurrent sampling requests of T tokens (as the sampling benchmark), and training
steps of B sequences x L tokens (forward_backward + optim_step, as train_throughput).
Ratio = tokens/s through Ray / tokens/s in-process: what the process boundary costs
(target >= 0.9x).
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable

from bench.common import Context, Target, close_quietly, log, median, row, stopwatch, time_in_turns
from bench.sampling import make_prompts, sdk_sample_concurrently
from bench.train_throughput import make_sequences, sdk_datums, sdk_step
from tinkerd_testing import Server


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"requests": 4, "prompt_len": 8, "new_tokens": 8, "batch": 2, "seq_len": 16, "rounds": 1, "steps": 1}
    return {"requests": 32, "prompt_len": 32, "new_tokens": 64, "batch": 8, "seq_len": 128, "rounds": 2, "steps": 2}


def ray_cluster(ctx: Context) -> str:
    """A local Ray cluster of this machine's usable cores; its address."""
    import ray

    token_file = ctx.work / "ray_auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)  # the Ray server started below finds it too
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    on_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=cores, include_dashboard=False, namespace="tinkerd-bench", logging_level="WARNING")
    signal.signal(signal.SIGTERM, on_sigterm)  # Ray's own handler would exit without stopping the servers
    return ray.get_runtime_context().gcs_address


def run(ctx: Context, smoke: bool) -> dict:
    import ray
    import tinker

    cfg = sizes(smoke)
    ctx.server()  # the in-process side, started first so the two servers never load at once
    with stopwatch() as elapsed:
        on_ray = Server(ctx.model_dir, ctx.work / "ray-data", ["--ray", ray_cluster(ctx)], model_name=ctx.model_name).start()
    log(f"tinkerd with its engine on Ray up in {elapsed():.1f} s")
    services: dict[str, tinker.ServiceClient] = {}
    try:
        services = {"in_process": ctx.service_client(), "ray": tinker.ServiceClient(base_url=on_ray.base_url, api_key="tml-bench")}
        samplers = {name: [sc.create_sampling_client(base_model=ctx.model_name).result()] for name, sc in services.items()}
        trainers = {name: sc.create_lora_training_client(base_model=ctx.model_name, rank=8, seed=0).result()
                    for name, sc in services.items()}
        prompts = make_prompts(ctx, cfg["requests"], cfg["prompt_len"])
        datums = sdk_datums(make_sequences(ctx, cfg["batch"], cfg["seq_len"]))
        for name in services:  # warm-up: first requests load lazily initialised state on each side
            sdk_sample_concurrently(samplers[name], prompts[:2], 2)
            sdk_step(trainers[name], datums)

        def progress(what: str) -> Callable[[int, dict[str, list[float]]], None]:
            return lambda round_index, step_s: log(f"{what} round {round_index + 1}: " + ", ".join(
                f"{name} {median(s):.2f} s" for name, s in step_s.items()))

        sampled_tokens = cfg["requests"] * cfg["new_tokens"]
        sample_s = time_in_turns({name: lambda name=name: sdk_sample_concurrently(samplers[name], prompts, cfg["new_tokens"])
                                  for name in services}, cfg["rounds"], cfg["steps"], progress("sampling"))
        trained_tokens = cfg["batch"] * cfg["seq_len"]
        train_s = time_in_turns({name: lambda name=name: sdk_step(trainers[name], datums) for name in services},
                                cfg["rounds"], cfg["steps"], progress("training"))
    finally:
        for sc in services.values():
            close_quietly(sc)
        on_ray.stop()
        ray.shutdown()
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        os.environ.pop("RAY_AUTH_MODE", None)  # set by ray.init for the cluster it started

    sample_rate = {name: sampled_tokens / median(s) for name, s in sample_s.items()}
    train_rate = {name: trained_tokens / median(s) for name, s in train_s.items()}
    log(f"sampling tok/s {sample_rate}, training tok/s {train_rate}")
    return {"rows": [
        row(f"sampling {cfg['requests']} x {cfg['new_tokens']}, engine on Ray", sample_rate["ray"], "tok/s",
            sample_rate["in_process"], Target(">=", 0.9), "the engine in the server's process"),
        row(f"train {cfg['batch']} x {cfg['seq_len']}, engine on Ray", train_rate["ray"], "tok/s",
            train_rate["in_process"], Target(">=", 0.9), "the engine in the server's process"),
    ]}
