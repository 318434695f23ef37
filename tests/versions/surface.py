"""One pass over the public surface of whichever `tinker` client imports here.

Run by each released client's own interpreter (tests/versions/sdk_venvs.py) against one
tinkerd:

    python surface.py --base-url http://127.0.0.1:PORT --out result.json

Every call is guarded, so one failure does not hide the others, and is recorded as
"ok", "failed" (with the error) or "n/a" (the client has no such API: found by looking
for the method, never by the version number). The JSON names the client's version and
lists the calls in the order they ran. Only the client and what it depends on are
imported: nothing of tinkerd or the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import httpx
import tinker
from tinker import types

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = [1, 504, 3458, 282, 4649, 314, 8744, 30]  # token ids of the default model's vocabulary
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


class NotAvailable(Exception):
    """The client has no such API."""


def need(obj: object, name: str):
    """The attribute `name` of obj, or NotAvailable where this client lacks it."""
    if not hasattr(obj, name):
        raise NotAvailable(f"{type(obj).__name__ if not isinstance(obj, type) else obj.__name__}.{name} does not exist")
    return getattr(obj, name)


def resolved(value, client_type: type):
    """Older clients return a client where newer ones return a future of it (which 0.38 still
    lets stand in for the client, with a warning)."""
    return value if type(value) is client_type else value.result()


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


class Surface:
    def __init__(self, base_url: str, api_key: str, work: Path):
        self.base_url, self.api_key, self.work = base_url, api_key, work
        self.calls: list[dict] = []
        self.state: dict[str, object] = {}

    def run(self, name: str, fn, *needs: str) -> None:
        started = time.monotonic()
        missing = [n for n in needs if n not in self.state]
        try:
            if missing:
                raise RuntimeError(f"not run: {', '.join(missing)} did not succeed")
            fn()
            entry = {"call": name, "status": "ok"}
        except NotAvailable as exc:
            entry = {"call": name, "status": "n/a", "detail": str(exc)}
        except Exception as exc:  # recorded, and the next call runs
            entry = {"call": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc(limit=6)}
        entry["seconds"] = round(time.monotonic() - started, 2)
        self.calls.append(entry)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).with_name("tinker")
        if not exe.exists():
            raise NotAvailable("this client installs no `tinker` command")
        env = {**os.environ, "TINKER_BASE_URL": self.base_url, "TINKER_API_KEY": self.api_key}
        proc = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=300, cwd=self.work)
        check(proc.returncode == 0, f"tinker {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
        return proc

    # -- the calls -------------------------------------------------------------------------

    def all(self) -> None:
        s = self.state
        sc = tinker.ServiceClient(base_url=self.base_url, api_key=self.api_key)
        rc = tinker.RestClient(base_url=self.base_url, api_key=self.api_key) if hasattr(tinker, "RestClient") \
            else sc.create_rest_client()
        data = [types.Datum(model_input=types.ModelInput.from_ints(PROMPT[:-1]),
                            loss_fn_inputs={"target_tokens": PROMPT[1:], "weights": [1.0] * (len(PROMPT) - 1)})]

        def capabilities():
            names = [m.model_name for m in sc.get_server_capabilities().supported_models]
            check(BASE_MODEL in names, f"{BASE_MODEL} not in {names}")

        def rest_capabilities():
            names = [m.model_name for m in need(rc, "get_server_capabilities")().result().supported_models]
            check(BASE_MODEL in names, f"{BASE_MODEL} not in {names}")

        def create_training_client():
            s["tc"] = resolved(sc.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=0), tinker.TrainingClient)
            s["run_id"] = s["tc"].model_id

        def forward_backward():
            out = s["tc"].forward_backward(data, "cross_entropy").result()
            check(len(out.loss_fn_outputs) == 1, f"{len(out.loss_fn_outputs)} outputs for one datum")
            logprobs = out.loss_fn_outputs[0]["logprobs"].tolist()
            check(len(logprobs) == len(PROMPT) - 1 and all(math.isfinite(x) and x <= 0 for x in logprobs),
                  f"logprobs {logprobs}")

        def forward_backward_custom():
            import torch

            def mean_nll(batch, logprobs_list):
                losses = [-(lp * torch.tensor(d.loss_fn_inputs["weights"].tolist())).sum() for d, lp in zip(batch, logprobs_list, strict=True)]
                loss = torch.stack(losses).mean()
                return loss, {"mean_nll": float(loss.detach())}

            out = s["tc"].forward_backward_custom(data, mean_nll).result()
            value = out.metrics.get("mean_nll")
            check(value is not None and math.isfinite(value) and value > 0, f"metrics {out.metrics}")

        def create_custom_loss():
            create = need(sc, "create_custom_loss")

            def neg_ll(logprobs, weights):
                loss = -(logprobs * weights).sum()
                return loss, {"custom/neg_ll:sum": loss}

            handle = create(neg_ll, input_ranks={"logprobs": 1, "weights": 1}).result()
            out = s["tc"].forward_backward_custom(data, handle).result()
            value = out.metrics.get("custom/neg_ll:sum")
            check(value is not None and math.isfinite(value) and value > 0, f"metrics {out.metrics}")

        def optim_step():
            s["tc"].optim_step(types.AdamParams(learning_rate=1e-3)).result()

        def save_state():
            s["state_path"] = s["tc"].save_state("state-1").result().path
            check(s["state_path"].startswith("tinker://"), s["state_path"])

        def load_state():
            s["tc"].load_state(s["state_path"]).result()

        def save_weights_for_sampler():
            s["sampler_path"] = s["tc"].save_weights_for_sampler("sampler-1").result().path

        def save_weights_and_get_sampling_client():
            sampler = resolved(s["tc"].save_weights_and_get_sampling_client("sampler-2"), tinker.SamplingClient)
            out = sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=1,
                                 sampling_params=types.SamplingParams(max_tokens=2, temperature=0.0)).result()
            check(len(out.sequences) == 1 and len(out.sequences[0].tokens) == 2, f"sequences {out.sequences}")

        def create_training_client_from_state():
            tc = resolved(sc.create_training_client_from_state(s["state_path"]), tinker.TrainingClient)
            check(tc.model_id != s["run_id"], "the restored client trains the same run")

        def create_sampling_client():
            s["sampler"] = resolved(sc.create_sampling_client(model_path=s["sampler_path"]), tinker.SamplingClient)

        def sample_with_prompt_logprobs():
            params = types.SamplingParams(max_tokens=4, temperature=0.0)
            out = s["sampler"].sample(types.ModelInput.from_ints(PROMPT), num_samples=2, sampling_params=params,
                                      include_prompt_logprobs=True).result()
            check(len(out.sequences) == 2 and all(len(q.tokens) == 4 for q in out.sequences), f"sequences {out.sequences}")
            lps = out.prompt_logprobs
            check(lps is not None and len(lps) == len(PROMPT) and lps[0] is None and all(x <= 0 for x in lps[1:]),
                  f"prompt_logprobs {lps}")
            s["prompt_logprobs"] = lps

        def compute_logprobs():
            lps = s["sampler"].compute_logprobs(types.ModelInput.from_ints(PROMPT)).result()
            check(len(lps) == len(PROMPT) and lps[0] is None, f"logprobs {lps}")
            diffs = [abs(a - b) for a, b in zip(lps[1:], s["prompt_logprobs"][1:], strict=True)]
            check(max(diffs) < 1e-3, f"compute_logprobs differs from the sample's prompt_logprobs by {max(diffs)}")

        def list_checkpoints():
            ids = {c.checkpoint_id for c in rc.list_checkpoints(s["run_id"]).result().checkpoints}
            check({"weights/state-1", "sampler_weights/sampler-1"} <= ids, f"checkpoints {ids}")

        def get_training_run():
            run = rc.get_training_run(s["run_id"]).result()
            check(run.training_run_id == s["run_id"] and run.base_model == BASE_MODEL, f"run {run}")

        def public_flag() -> bool:
            by_id = {c.checkpoint_id: c for c in rc.list_checkpoints(s["run_id"]).result().checkpoints}
            return by_id["sampler_weights/sampler-1"].public

        def publish():
            rc.publish_checkpoint_from_tinker_path(s["sampler_path"]).result()
            check(public_flag(), "not public after publish")

        def unpublish():
            rc.unpublish_checkpoint_from_tinker_path(s["sampler_path"]).result()
            check(not public_flag(), "still public after unpublish")

        def archive_url():
            get = need(rc, "get_checkpoint_archive_url_from_tinker_path")
            url = get(s["state_path"]).result().url
            archive = self.work / "archive.tar"
            with httpx.stream("GET", url, timeout=120) as response:
                response.raise_for_status()
                with open(archive, "wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
            with tarfile.open(archive) as tar:
                names = set(tar.getnames())
            check(ADAPTER_FILES <= names and "checkpoint_complete" in names, f"archive holds {sorted(names)}")

        def save_weights_external():
            save = need(s["tc"], "save_weights_external")
            s["external_path"] = save("external-1").result().path

        def external_weights_urls():
            urls = need(rc, "get_external_weights_urls")(s["external_path"]).result().urls
            check(ADAPTER_FILES <= set(urls), f"files {sorted(urls)}")
            config = httpx.get(urls["adapter_config.json"], timeout=60)
            config.raise_for_status()
            check(config.json().get("r") == 4, f"adapter_config {config.text[:200]}")

        def cli_checkpoint_list():
            listed = json.loads(self.cli("-f", "json", "checkpoint", "list", "--run-id", s["run_id"]).stdout)
            ids = {c["checkpoint_id"] for c in listed["checkpoints"]}
            check("weights/state-1" in ids, f"tinker checkpoint list: {sorted(ids)}")

        def cli_checkpoint_download():
            out = self.work / "download"
            self.cli("-f", "json", "checkpoint", "download", s["state_path"], "--output", str(out))
            files = {p.name for p in out.rglob("*") if p.is_file()}
            check(ADAPTER_FILES <= files, f"tinker checkpoint download wrote {sorted(files)}")

        def delete_checkpoint():
            rc.delete_checkpoint_from_tinker_path(s["sampler_path"]).result()
            ids = {c.checkpoint_id for c in rc.list_checkpoints(s["run_id"]).result().checkpoints}
            check("sampler_weights/sampler-1" not in ids, f"still listed after delete: {sorted(ids)}")

        run = self.run
        run("ServiceClient.get_server_capabilities", capabilities)
        run("RestClient.get_server_capabilities", rest_capabilities)
        run("create_lora_training_client", create_training_client)
        run("forward_backward (cross_entropy)", forward_backward, "tc")
        run("forward_backward_custom", forward_backward_custom, "tc")
        run("ServiceClient.create_custom_loss + forward_backward_custom", create_custom_loss, "tc")
        run("optim_step", optim_step, "tc")
        run("save_state", save_state, "tc")
        run("load_state", load_state, "state_path")
        run("create_training_client_from_state", create_training_client_from_state, "state_path")
        run("save_weights_for_sampler", save_weights_for_sampler, "tc")
        run("save_weights_and_get_sampling_client", save_weights_and_get_sampling_client, "tc")
        run("create_sampling_client", create_sampling_client, "sampler_path")
        run("sample (include_prompt_logprobs)", sample_with_prompt_logprobs, "sampler")
        run("compute_logprobs", compute_logprobs, "sampler", "prompt_logprobs")
        run("RestClient.list_checkpoints", list_checkpoints, "state_path", "sampler_path")
        run("RestClient.get_training_run", get_training_run, "run_id")
        run("RestClient.publish_checkpoint_from_tinker_path", publish, "sampler_path")
        run("RestClient.unpublish_checkpoint_from_tinker_path", unpublish, "sampler_path")
        run("RestClient.get_checkpoint_archive_url_from_tinker_path", archive_url, "state_path")
        run("save_weights_external", save_weights_external, "tc")
        run("RestClient.get_external_weights_urls", external_weights_urls, "external_path")
        run("tinker checkpoint list", cli_checkpoint_list, "state_path")
        run("tinker checkpoint download", cli_checkpoint_download, "state_path")
        run("RestClient.delete_checkpoint_from_tinker_path", delete_checkpoint, "sampler_path")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-versions"))
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tinker-surface-") as work:
        surface = Surface(args.base_url, args.api_key, Path(work))
        surface.all()
    args.out.write_text(json.dumps({"tinker": tinker.__version__, "calls": surface.calls}, indent=1) + "\n")
    # The outcome is written. Leave without the interpreter's teardown: the client's event loop
    # (and torch's thread pools, from the custom loss) are still running then, and a daemon
    # thread woken during Python 3.11's finalization now and then aborts the process (SIGABRT,
    # no message), which would read as a failed client although every call was recorded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
