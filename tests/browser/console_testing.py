"""What the browser tier's tests and fixtures share: the server's key and base model,
chromium's flags, where screenshots go, signing in, a run trained through the SDK, and
plain REST calls to check what the page shows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tinkerd_testing import REPO

API_KEY = "tml-console-test"  # the only key this server accepts
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
SENTENCE = "Zebras drink purple lemonade on Tuesdays."  # what the run learns; the base model does not say it
ARTIFACTS = Path(os.environ.get("TINKERD_TEST_ARTIFACTS", REPO / ".data" / "test-artifacts")) / "console"

# Playwright's defaults already turn off most background traffic; these close the rest
# (component updates, field trials, safe browsing, DNS prefetch), since the test machine
# has no route to the internet and chromium would otherwise keep retrying.
CHROMIUM_FLAGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-sync",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-pings",
    "--metrics-recording-only",
    "--safebrowsing-disable-auto-update",
    "--dns-prefetch-disable",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,CertificateTransparencyComponentUpdater,"
    "AutofillServerCommunication,InterestFeedContentSuggestions",
]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Debian's chromium is not installed: run `make browser` (make test and make test-browser run it first)")
    return path


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page, base_url: str, key: str = API_KEY, hash_route: str = "#/runs") -> None:
    page.goto(f"{base_url}/console/{hash_route}")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def sft_datum(tokenizer, text: str):
    from tinker import types

    ids = tokenizer.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


class Trainer:
    """A training run driven through the SDK, counting the losses it reported."""

    def __init__(self, base_url: str, tokenizer, text: str = SENTENCE, seed: int = 0):
        import tinker

        self.service = tinker.ServiceClient(base_url=base_url, api_key=API_KEY)
        # A fixed seed: 8 steps from a random start did not always teach the sentence (the
        # compare test once saw " drink drink ..." without "purple").
        self.client = self.service.create_lora_training_client(base_model=BASE, rank=8, seed=seed)
        self.run_id = self.client.get_info().model_id
        self.datum = sft_datum(tokenizer, text)
        self.losses = 0
        self.sampler_path: str | None = None

    def steps(self, n: int) -> None:
        from tinker import types

        for _ in range(n):
            self.client.forward_backward([self.datum], "cross_entropy").result()
            self.client.optim_step(types.AdamParams(learning_rate=5e-3)).result()
            self.losses += 1


def rest(srv, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, srv.base_url + path, headers={"X-API-Key": API_KEY}, timeout=60, **kwargs)
