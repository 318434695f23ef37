"""The version matrix: every released `tinker` client (0.34, 0.35, 0.36, 0.38) runs the same
script over the public surface against one tinkerd, each from its own venv.

The four clients run at once (the server interleaves them, as it would four users); each
writes its calls' outcomes as JSON, which the table in docs/sdk-versions.md and the README
is rendered from. A call is n/a only where that client lacks the API; every other call must
be ok. The venvs are built on first use (about 15 s each, from the package index) and then
reused; `make sdk-versions` builds them ahead.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sdk_table import DOC, README, RESULTS, load_results, readme_table, render
from sdk_venvs import VERSIONS, ensure_venv

from tinkerd_testing import Server

pytestmark = pytest.mark.sdk_versions

SURFACE = Path(__file__).with_name("surface.py")
# What each client lacks, found by the script itself (hasattr): create_custom_loss came in
# 0.36, the archive download went after 0.35, RestClient.get_server_capabilities came in 0.38.
CUSTOM_LOSS = "ServiceClient.create_custom_loss + forward_backward_custom"
EXPECTED_NA = {
    "0.34.0": {"RestClient.get_server_capabilities", CUSTOM_LOSS},
    "0.35.0": {"RestClient.get_server_capabilities", CUSTOM_LOSS},
    "0.36.0": {"RestClient.get_server_capabilities", "RestClient.get_checkpoint_archive_url_from_tinker_path"},
    "0.38.0": {"RestClient.get_checkpoint_archive_url_from_tinker_path"},
}


def run_surface(version: str, base_url: str, log_dir: Path) -> subprocess.CompletedProcess:
    # PYTHONFAULTHANDLER: a crash of the client's interpreter prints its threads' stacks to the log.
    env = {**os.environ, "TINKER_API_KEY": f"tml-sdk-{version}", "PYTHONFAULTHANDLER": "1"}
    env.pop("PYTHONPATH", None)  # the client's venv alone: nothing of tinkerd or the suite
    log = log_dir / f"tinker-{version}.log"
    with open(log, "w") as out:
        proc = subprocess.run([str(ensure_venv(version)), str(SURFACE), "--base-url", base_url,
                               "--out", str(RESULTS / f"tinker-{version}.json")],
                              stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600)
    assert proc.returncode == 0, f"surface.py under tinker {version} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def matrix(model_dir, tmp_path_factory) -> dict[str, list[dict]]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for old in RESULTS.glob("tinker-*.json"):
        old.unlink()
    with ThreadPoolExecutor(len(VERSIONS)) as pool:  # a built one is a stamp check
        list(pool.map(ensure_venv, VERSIONS))
    srv = Server(model_dir, tmp_path_factory.mktemp("sdk-versions") / "data").start()
    try:
        with ThreadPoolExecutor(len(VERSIONS)) as pool:
            for future in [pool.submit(run_surface, v, srv.base_url, RESULTS) for v in VERSIONS]:
                future.result()
    finally:
        srv.stop()
    results = load_results()
    (RESULTS / "table.md").write_text(render(results))
    return results


@pytest.mark.parametrize("version", VERSIONS)
def test_every_call_of_the_client_works(matrix, version):
    calls = matrix[version]
    failed = [f"{c['call']}: {c['error']}" for c in calls if c["status"] == "failed"]
    assert not failed, f"tinker {version}:\n" + "\n".join(failed)
    absent = {c["call"] for c in calls if c["status"] == "n/a"}
    assert absent == EXPECTED_NA[version], f"tinker {version}: n/a {sorted(absent)}, expected {sorted(EXPECTED_NA[version])}"
    assert len(calls) == len(matrix[VERSIONS[-1]])


def test_the_published_table_is_the_measured_one(matrix):
    table = render(matrix)
    fix = "run `make sdk-versions-docs` to copy the measured table into them"
    assert readme_table(README.read_text()) == table, f"README.md's SDK table differs from the measured one: {fix}"
    assert DOC.read_text().endswith(table), f"{DOC.name}'s table differs from the measured one: {fix}"
