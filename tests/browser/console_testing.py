"""What the browser tier's tests and fixtures share: the server's key, chromium's flags,
where screenshots go, and signing in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tinkerd_testing import REPO

API_KEY = "tml-console-test"  # the only key this server accepts
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
