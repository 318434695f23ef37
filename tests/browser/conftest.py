"""The browser tier: a real tinkerd with one trained run, and Debian's chromium driven by
Playwright with the system browser as its executable (Playwright never downloads one).

The server, the run and the browser are started once for the whole tier (model loads and
training dominate its time); each test gets a fresh browser context and page.

`make browser` installs chromium with apt-get (`make test` and `make test-browser` do it
first). Screenshots of each page are written to .data/test-artifacts/console/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from console_testing import API_KEY, CHROMIUM_FLAGS, Trainer, chromium_path

from tinkerd_testing import Server


@pytest.fixture(scope="module")  # its event loop ends with each module: later tests run asyncio loops of their own
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture(scope="session")
def console_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = Server(model_dir, tmp_path_factory.mktemp("console") / "data", ["--api-key", API_KEY]).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def run(console_server, tokenizer) -> Trainer:
    """A run trained 10 steps on one sentence (from a fixed seed), with a sampler checkpoint of it."""
    trainer = Trainer(console_server.base_url, tokenizer)
    trainer.steps(10)
    trainer.sampler_path = trainer.client.save_weights_for_sampler("trained").result().path
    return trainer
