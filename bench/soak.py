"""Soak: clients of two users against one server for minutes, with a `kill -9` in the middle.

    python -m bench.soak [--minutes 10] [--clients 16] [--out PATH]

Two users (alice and bob, keys from `tinkerd keys create`) share one `tinkerd serve`. Each
client is a thread with a random loop of its user's work, through the unmodified tinker and
openai SDKs: LoRA training steps, SDK sampling of the base model and of its own checkpoints,
OpenAI completions and chat (some streamed) on both, raw HTTP streams that hang up after
the first chunk, training-state and sampler saves (some with a TTL of seconds), deletes of
its own older checkpoints, publishing one, and probes of the other user's checkpoints (a
private one must answer 404; a published one must load). Halfway through the server is
killed with SIGKILL and started again on the same data dir and port; the clients run as long
after the restart as before the kill.

Errors are sorted as they happen. Expected ones: a connection refused or cut while the
server was down; a request in flight at the kill, failed by the new process ("the server
restarted while it ran"); and, after the restart, a training model, sampler or session of
the old process reported unknown (in-memory state dies with a process): the client then
opens a new session and resumes training from its last acknowledged save_state. Everything
else is unexpected. At the end every checkpoint acknowledged as saved must load (training
states into a training client, sampler weights by sampling a token), except those deleted
on purpose, which must be gone, and those with a TTL, which must be gone once it passed.

Prints a report and writes JSON (default bench/results/soak.json); exits 1 on any
unexpected error or checkpoint that does not load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, Context, log, machine_info, one_compute_thread

RESULTS = Path(__file__).resolve().parent / "results"
OUTAGE_GRACE_S = 5.0  # after the restarted server answers, calls that began before it may still fail
TEXTS = [
    "Q: What is the capital of France?\nA: Paris.",
    "Q: How many legs does a spider have?\nA: Eight.",
    "Q: What colour is the sky on a clear day?\nA: Blue.",
    "Q: What is two plus two?\nA: Four.",
]
# Relative frequency of each operation in a client's loop.
OPERATIONS = {
    "train": 4, "sample_sdk": 4, "sample_openai": 3, "hang_up": 1, "save_state": 1, "save_sampler": 1,
    "save_sampler_ttl": 0.5, "delete": 0.5, "publish": 0.2, "probe_other_user": 0.8,
}
STATE_LOST_MARKERS = ("unknown model_id", "unknown or expired session", "unknown sampling session", "unknown session",
                      "has ended: the server restarted")
RESTART_MARKERS = ("restarted while it ran", "has ended: the server restarted")


@dataclass
class Saved:
    path: str
    user: str
    kind: str  # "state" or "sampler"
    ttl_s: int | None = None
    acknowledged_at: float = 0.0
    deleted: bool = False
    delete_unsure: bool = False  # a delete that failed in the outage may or may not have happened
    published: bool = False


@dataclass
class Outage:
    """When the server was down: from the kill until the new process answered."""

    killed_at: float | None = None
    ready_at: float | None = None
    epoch: int = 0  # how many restarts so far

    def overlaps(self, start: float, end: float) -> bool:
        if self.killed_at is None:
            return False
        ready = self.ready_at if self.ready_at is not None else float("inf")
        return start <= ready + OUTAGE_GRACE_S and end >= self.killed_at


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: Counter = field(default_factory=Counter)
    done_after_restart: Counter = field(default_factory=Counter)
    expected: Counter = field(default_factory=Counter)
    unexpected: list[dict] = field(default_factory=list)
    saved: list[Saved] = field(default_factory=list)

    def ok(self, op: str, after_restart: bool) -> None:
        with self.lock:
            self.done[op] += 1
            if after_restart:
                self.done_after_restart[op] += 1

    def expect(self, kind: str) -> None:
        with self.lock:
            self.expected[kind] += 1

    def fail(self, client: str, op: str, what: str) -> None:
        with self.lock:
            self.unexpected.append({"client": client, "op": op, "error": what, "at": time.strftime("%H:%M:%S")})
        log(f"UNEXPECTED {client} {op}: {what.splitlines()[-1] if what else what}")

    def acknowledge(self, saved: Saved) -> None:
        with self.lock:
            self.saved.append(saved)

    def of_user(self, user: str, **where: Any) -> list[Saved]:
        with self.lock:
            return [s for s in self.saved if s.user == user and all(getattr(s, k) == v for k, v in where.items())]


def is_connection_error(exc: BaseException) -> bool:
    import httpx
    import openai
    import tinker

    return isinstance(exc, (httpx.TransportError, openai.APIConnectionError, tinker.APIConnectionError, ConnectionError))


def is_not_found(exc: BaseException) -> bool:
    import httpx
    import openai
    import tinker

    if isinstance(exc, (tinker.NotFoundError, openai.NotFoundError)):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 404


class SoakClient:
    def __init__(self, name: str, user: str, key: str, base_url: str, model: str, tokenizer: Any, tally: Tally,
                 outage: Outage, seed: int) -> None:
        self.name, self.user, self.key, self.base_url, self.model = name, user, key, base_url, model
        self.tokenizer, self.tally, self.outage = tokenizer, tally, outage
        self.rng = random.Random(seed)
        self.saves = 0
        self.last_state: str | None = None
        self.epoch = -1  # the server epoch this client's sessions belong to
        self.samplers: dict[str, Any] = {}  # model path (or "" for the base model) -> SamplingClient
        self.training: Any = None
        self.service: Any = None
        self.own_paths: set[str] = set()  # checkpoints this client saved and still uses

    # -- sessions ---------------------------------------------------------------------------

    def connect(self) -> None:
        """A new session: a training client (from the last acknowledged state, if any) and samplers."""
        import openai
        import tinker

        self.epoch = self.outage.epoch
        self.service = tinker.ServiceClient(base_url=self.base_url, api_key=self.key)
        if self.last_state is None:
            self.training = self.service.create_lora_training_client(base_model=self.model, rank=2,
                                                                     seed=self.rng.randrange(1000)).result()
        else:
            self.training = self.service.create_training_client_from_state_with_optimizer(self.last_state).result()
            self.tally.ok("resume_from_state", self.outage.epoch > 0)
        self.samplers = {"": self.service.create_sampling_client(base_model=self.model).result()}
        self.oai = openai.OpenAI(base_url=self.base_url + "/oai/api/v1", api_key=self.key, max_retries=0, timeout=120)

    def datum(self) -> Any:
        from tinker import types

        ids = self.tokenizer.encode(self.rng.choice(TEXTS))
        return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                           loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})

    def prompt_text(self) -> str:
        return self.rng.choice(TEXTS).split("\nA:")[0] + "\nA:"

    def own_sampler_path(self) -> str | None:
        """One of this client's sampler checkpoints that stays (no TTL, not deleted)."""
        mine = [s for s in self.tally.of_user(self.user, kind="sampler", ttl_s=None, deleted=False, delete_unsure=False)
                if s.path in self.own_paths]
        return self.rng.choice(mine).path if mine else None

    # -- operations -------------------------------------------------------------------------

    def train(self) -> None:
        from tinker import types

        self.training.forward_backward([self.datum()], "cross_entropy").result()
        self.training.optim_step(types.AdamParams(learning_rate=1e-3)).result()

    def sample_sdk(self) -> None:
        from tinker import types

        path = self.own_sampler_path() if self.rng.random() < 0.5 else None
        key = path or ""
        if key not in self.samplers:
            self.samplers[key] = self.service.create_sampling_client(model_path=path).result()
        prompt = types.ModelInput.from_ints(self.tokenizer.encode(self.prompt_text()))
        params = types.SamplingParams(max_tokens=self.rng.randint(1, 8), temperature=1.0, seed=self.rng.randrange(10**6))
        result = self.samplers[key].sample(prompt, 1, params).result()
        assert result.sequences and result.sequences[0].tokens, result

    def sample_openai(self) -> None:
        model = (self.own_sampler_path() if self.rng.random() < 0.5 else None) or self.model
        max_tokens, stream = self.rng.randint(1, 8), self.rng.random() < 0.4
        if self.rng.random() < 0.5:
            out = self.oai.completions.create(model=model, prompt=self.prompt_text(), max_tokens=max_tokens, stream=stream)
        else:
            out = self.oai.chat.completions.create(model=model, max_tokens=max_tokens, stream=stream,
                                                   messages=[{"role": "user", "content": self.prompt_text()}])
        chunks = list(out) if stream else [out]
        assert any(c.choices for c in chunks), chunks

    def hang_up(self) -> None:
        """A streaming client that reads the first chunk and goes away mid-stream."""
        import httpx

        body = {"model": self.model, "prompt": self.prompt_text(), "max_tokens": 64, "stream": True}
        with httpx.Client(timeout=120) as http, http.stream(
                "POST", self.base_url + "/oai/api/v1/completions", json=body, headers={"Authorization": f"Bearer {self.key}"}) as resp:
            resp.raise_for_status()
            for _ in resp.iter_bytes():
                break  # closing the connection here is the point

    def _save(self, kind: str, ttl_s: int | None = None) -> None:
        self.saves += 1
        name = f"{self.name}-{kind}-{self.saves}"
        if kind == "state":
            path = self.training.save_state(name).result().path
        else:
            path = self.training.save_weights_for_sampler(name, ttl_seconds=ttl_s).result().path
        self.tally.acknowledge(Saved(path, self.user, kind, ttl_s, time.time()))
        self.own_paths.add(path)
        if kind == "state":
            self.last_state = path

    def save_state(self) -> None:
        self._save("state")

    def save_sampler(self) -> None:
        self._save("sampler")

    def save_sampler_ttl(self) -> None:
        self._save("sampler", ttl_s=self.rng.randint(2, 20))

    def delete(self) -> bool:
        """Delete one of this client's older checkpoints (never the state it would resume from)."""
        import tinker

        candidates = [s for s in self.tally.of_user(self.user, deleted=False, delete_unsure=False, published=False, ttl_s=None)
                      if s.path in self.own_paths and s.path != self.last_state]
        if not candidates:
            return False
        victim = self.rng.choice(candidates)
        self.own_paths.discard(victim.path)  # no more samples from it from here on
        self.samplers.pop(victim.path, None)
        try:
            tinker.RestClient(base_url=self.base_url, api_key=self.key).delete_checkpoint_from_tinker_path(victim.path).result()
        except BaseException:
            victim.delete_unsure = True
            raise
        victim.deleted = True
        return True

    def publish(self) -> bool:
        import tinker

        candidates = [s for s in self.tally.of_user(self.user, kind="sampler", deleted=False, delete_unsure=False,
                                                    published=False, ttl_s=None) if s.path in self.own_paths]
        if not candidates:
            return False
        chosen = self.rng.choice(candidates)
        tinker.RestClient(base_url=self.base_url, api_key=self.key).publish_checkpoint_from_tinker_path(chosen.path).result()
        chosen.published = True  # from now on never deleted (deletes skip published checkpoints)
        return True

    def probe_other_user(self) -> bool:
        """The other user's private checkpoints answer 404 at every door; a published one loads."""
        import openai
        import tinker

        other = "bob" if self.user == "alice" else "alice"
        theirs = [s for s in self.tally.of_user(other, ttl_s=None) if s.kind == "sampler" or not s.published]
        if not theirs:
            return False
        target = self.rng.choice(theirs)
        if target.published:
            self.service.create_sampling_client(model_path=target.path).result()
            return True
        try:
            if self.rng.random() < 0.5:
                self.service.create_sampling_client(model_path=target.path).result()
            else:
                self.oai.completions.create(model=target.path, prompt="Hi", max_tokens=1)
        except (tinker.NotFoundError, openai.NotFoundError):
            return True
        if target.published:  # published between the pick and the call: readable is right
            return True
        raise AssertionError(f"{self.user} could read {other}'s private checkpoint {target.path}")

    # -- the loop -----------------------------------------------------------------------------

    def classify(self, exc: BaseException, started: float, epoch: int) -> str | None:
        """The expected error this is, or None."""
        text = str(exc)
        if is_connection_error(exc) and self.outage.overlaps(started, time.time()):
            return "connection error while the server was down"
        if any(m in text for m in RESTART_MARKERS) and self.outage.killed_at is not None and started <= (self.outage.ready_at or time.time()):
            return "request in flight at the kill, failed after the restart"
        if epoch < self.outage.epoch and is_not_found(exc) and any(m in text for m in STATE_LOST_MARKERS):
            return "session state of the killed process reported unknown"
        if self.outage.overlaps(started, time.time()) and ("Server error" in text or "503" in text):
            return "server error while the server was down"
        return None

    def run(self, stop: threading.Event) -> None:
        ops, weights = list(OPERATIONS), list(OPERATIONS.values())
        while not stop.is_set():
            if self.epoch < 0:
                started, epoch = time.time(), self.outage.epoch
                try:
                    self.connect()
                except BaseException as exc:  # noqa: BLE001 - sorted below
                    self.sort(exc, "connect", started, epoch)
                    time.sleep(1.0)
                    continue
            op = self.rng.choices(ops, weights)[0]
            started, epoch = time.time(), self.epoch
            try:
                if getattr(self, op)() is not False:  # False: nothing to do this time (nothing to delete, ...)
                    self.tally.ok(op, self.outage.epoch > 0)
            except BaseException as exc:  # noqa: BLE001 - sorted below
                self.sort(exc, op, started, epoch)

    def sort(self, exc: BaseException, op: str, started: float, epoch: int) -> None:
        kind = self.classify(exc, started, epoch)
        if kind is None:
            self.tally.fail(self.name, op, "".join(traceback.format_exception(exc))[-3000:])
            return
        self.tally.expect(kind)
        if self.outage.epoch > self.epoch:
            self.epoch = -1  # reconnect: the sessions of the old process are gone


# -- the run --------------------------------------------------------------------------------


def create_keys(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    keys = {}
    for user in ("alice", "bob"):
        proc = subprocess.run([sys.executable, "-m", "tinkerd.cli", "keys", "create", "--name", user, "--data-dir", str(data_dir)],
                              env=env, capture_output=True, text=True, timeout=120, check=True)
        keys[user] = proc.stdout.strip()
    return keys


def verify_checkpoints(base_url: str, keys: dict[str, str], saved: list[Saved], model: str, tokenizer: Any) -> dict:
    """Every acknowledged checkpoint loads, unless deleted (then it is gone) or past its TTL (gone too)."""
    import tinker
    from tinker import types

    prompt = types.ModelInput.from_ints(tokenizer.encode("Hello"))
    outcome: dict[str, list[str]] = {"loaded": [], "gone_as_deleted": [], "gone_after_ttl": [], "failed": [],
                                     "delete_unsure_skipped": []}
    lock = threading.Lock()

    def check(item: Saved) -> None:
        service = tinker.ServiceClient(base_url=base_url, api_key=keys[item.user])
        detail = ""
        try:
            if item.delete_unsure:
                result = "delete_unsure_skipped"
            elif item.deleted or item.ttl_s is not None:
                try:
                    service.create_sampling_client(model_path=item.path).result() if item.kind == "sampler" else \
                        service.create_training_client_from_state(item.path).result()
                    result = "failed"
                    detail = "still loads after it was deleted" if item.deleted else f"still loads after its TTL of {item.ttl_s} s"
                except tinker.NotFoundError:
                    result = "gone_as_deleted" if item.deleted else "gone_after_ttl"
            elif item.kind == "state":
                training = service.create_training_client_from_state_with_optimizer(item.path).result()
                assert training.get_info().model_id
                result = "loaded"
            else:
                sampler = service.create_sampling_client(model_path=item.path).result()
                assert sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1, seed=1)).result().sequences
                result = "loaded"
        except Exception as exc:  # noqa: BLE001 - reported
            result, detail = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            try:
                service.close("success").result(timeout=60)  # frees the adapters it loaded
            except Exception:  # noqa: BLE001 - cleanup only
                pass
        with lock:
            outcome[result].append(f"{item.path}: {detail}" if result == "failed" else item.path)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, saved))
    return outcome


def soak(minutes: float, clients: int, work: Path | None = None, seed: int = 0) -> dict:
    from tinkerd_testing import Server

    ctx = Context.create(smoke=False)
    tokenizer = ctx.tokenizer  # once, here: transformers' lazy imports are not thread-safe
    data_dir = (work or ctx.work) / "soak-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = create_keys(data_dir)
    with one_compute_thread():  # correctness, not speed, is checked here
        server = Server(ctx.model_dir, data_dir).start(timeout=300)
    tally, outage, stop = Tally(), Outage(), threading.Event()
    half = minutes * 30
    started = time.time()
    try:
        workers = [SoakClient(f"c{i}", "alice" if i % 2 == 0 else "bob", keys["alice" if i % 2 == 0 else "bob"],
                              server.base_url, ctx.model_name, tokenizer, tally, outage, seed * 1000 + i) for i in range(clients)]
        threads = [threading.Thread(target=w.run, args=(stop,), name=w.name, daemon=True) for w in workers]
        for t in threads:
            t.start()
        log(f"soak: {clients} clients of alice and bob for {minutes:g} min on {server.base_url}")
        time.sleep(half)
        log(f"soak: kill -9 of the server (pid {server.proc.pid}) after {time.time() - started:.0f} s; "
            f"{sum(tally.done.values())} operations so far")
        outage.killed_at = time.time()
        server.kill9()
        with one_compute_thread():
            server.start(timeout=300)
        outage.ready_at = time.time()
        outage.epoch += 1
        log(f"soak: the server is back after {outage.ready_at - outage.killed_at:.1f} s")
        until = outage.ready_at + half  # as long after the restart as before the kill
        while time.time() < until:
            time.sleep(min(30.0, max(0.0, until - time.time())))
            log(f"soak: {sum(tally.done.values())} operations, {sum(tally.expected.values())} expected errors, "
                f"{len(tally.unexpected)} unexpected")
        stop.set()
        for t in threads:
            t.join(timeout=600)
        stuck = [t.name for t in threads if t.is_alive()]
        for name in stuck:
            tally.fail(name, "finish", "the client did not finish its last operation within 10 minutes")
        ended = time.time()
        # Past every TTL, and past the janitor's next pass (every 5 s), before checking they are gone.
        latest_expiry = max((s.acknowledged_at + s.ttl_s for s in tally.saved if s.ttl_s), default=0)
        time.sleep(max(0.0, latest_expiry + 12 - time.time()))
        log(f"soak: checking the {len(tally.saved)} acknowledged checkpoints")
        checks = verify_checkpoints(server.base_url, keys, tally.saved, ctx.model_name, tokenizer)
        alive_at_end = server.proc.poll() is None
    finally:
        server.stop()
    return {
        "minutes": minutes, "clients": clients, "users": ["alice", "bob"], "run_s": ended - started,
        "outage_s": outage.ready_at - outage.killed_at, "killed_after_s": outage.killed_at - started,
        "operations": dict(sorted(tally.done.items())), "requests": sum(tally.done.values()),
        "operations_after_restart": dict(sorted(tally.done_after_restart.items())),
        "expected_errors": dict(tally.expected), "unexpected_errors": tally.unexpected,
        "checkpoints": {k: len(v) for k, v in checks.items()}, "checkpoint_failures": checks["failed"],
        "checkpoints_by_kind": dict(Counter(s.kind + (" (TTL)" if s.ttl_s else "") for s in tally.saved)),
        "server_alive_at_end": alive_at_end,
    }


def report(result: dict) -> str:
    lines = [f"soak: {result['clients']} clients of 2 users, {result['run_s'] / 60:.1f} min, "
             f"kill -9 after {result['killed_after_s']:.0f} s, back in {result['outage_s']:.1f} s"]
    after = result["operations_after_restart"]
    lines.append(f"operations completed: {result['requests']} ({sum(after.values())} after the restart)")
    lines += [f"  {op:<20} {n:>6} ({after.get(op, 0)} after the restart)" for op, n in result["operations"].items()]
    lines.append(f"expected errors: {sum(result['expected_errors'].values())}")
    lines += [f"  {n:>5}  {kind}" for kind, n in result["expected_errors"].items()]
    lines.append(f"unexpected errors: {len(result['unexpected_errors'])}")
    lines += [f"  {e['client']} {e['op']}: {e['error'].strip().splitlines()[-1]}" for e in result["unexpected_errors"][:20]]
    c = result["checkpoints"]
    lines.append(f"checkpoints acknowledged: {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in result['checkpoints_by_kind'].items())}); "
                 f"loaded {c['loaded']}, gone as deleted {c['gone_as_deleted']}, gone after TTL {c['gone_after_ttl']}, "
                 f"delete unsure {c['delete_unsure_skipped']}, FAILED {c['failed']}")
    lines += [f"  {f}" for f in result["checkpoint_failures"][:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the clients run (default 10)")
    ap.add_argument("--clients", type=int, default=16, help="client threads, alternately alice's and bob's (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON output path (default bench/results/soak.json)")
    args = ap.parse_args(argv)
    machine = machine_info()
    result = soak(args.minutes, args.clients, seed=args.seed)
    print(report(result))
    out = Path(args.out) if args.out else RESULTS / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine, **result}, indent=2, default=str))
    print(f"wrote {out}")
    failed = result["unexpected_errors"] or result["checkpoint_failures"] or not result["server_alive_at_end"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
