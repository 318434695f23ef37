"""The web console in a real browser, against a real tinkerd trained through the tinker SDK.

One server (which accepts only its own API key) and one run trained to say a sentence the
base model does not; each test drives the console the way a user would and checks what the
page shows against what the SDK, the REST routes and the OpenAI SDK say.
"""

from __future__ import annotations

import re

import httpx
import pytest
from console_testing import API_KEY, BASE, Trainer, rest, screenshot, sign_in
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PROMPT = "Zebras drink"


def test_a_wrong_key_is_refused_with_a_message(console_server, page):
    response = page.goto(console_server.base_url + "/")
    assert page.url == console_server.base_url + "/console/"  # `/` leads to the console
    assert response.headers["content-security-policy"] == "default-src 'self'"
    sign_in(page, console_server.base_url, key="tml-not-this-one")
    expect(page.get_by_role("alert")).to_contain_text("refused this API key")
    expect(page.get_by_label("API key")).to_be_visible()
    screenshot(page, "sign-in-refused")


def test_runs_page_lists_the_run_and_loads_nothing_from_elsewhere(console_server, run, page):
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    sign_in(page, console_server.base_url)
    expect(page.get_by_label("API key")).to_be_hidden()
    row = page.locator(f'tr[data-run="{run.run_id}"]')
    expect(row).to_contain_text(BASE)
    expect(row).to_contain_text("connected")
    expect(row.locator("td").nth(5)).to_have_text(str(run.losses))  # steps so far
    page.get_by_label("Search runs").fill("no-such-run")
    expect(page.locator("tr[data-run]")).to_have_count(0)
    page.get_by_label("Search runs").fill(run.run_id[:8])
    expect(row).to_be_visible()
    screenshot(page, "runs")
    assert requested and all(url.startswith(console_server.base_url + "/") for url in requested), requested


def test_the_loss_curve_has_every_point_and_grows_while_the_run_trains(console_server, run, page):
    sign_in(page, console_server.base_url, hash_route=f"#/runs/{run.run_id}")
    legend = page.get_by_test_id("series")
    reported = [m for m in rest(console_server, "GET", f"/api/v1/training_runs/{run.run_id}/metrics").json()["metrics"] if m["key"] == "loss:sum"]
    assert len(reported) == run.losses
    expect(legend).to_contain_text(f"loss:sum: {run.losses} points")
    expect(page.locator(".chart canvas")).to_have_count(1)
    run.steps(2)  # the SDK keeps training while the page is open
    expect(legend).to_contain_text(f"loss:sum: {run.losses} points")
    page.locator(".chart").scroll_into_view_if_needed()
    screenshot(page, "run")


def test_another_run_overlaid_on_the_chart_brings_its_own_points(console_server, run, tokenizer, page):
    other = Trainer(console_server.base_url, tokenizer, text="Giraffes prefer jazz to opera.")
    other.steps(3)
    sign_in(page, console_server.base_url, hash_route=f"#/runs/{run.run_id}")
    legend = page.get_by_test_id("series")
    expect(legend).to_contain_text("loss:sum:")  # the run's own curve is drawn
    page.get_by_label("Overlay another run").select_option(other.run_id)

    for trainer in (run, other):
        reported = [m for m in rest(console_server, "GET", f"/api/v1/training_runs/{trainer.run_id}/metrics").json()["metrics"] if m["key"] == "loss:sum"]
        assert len(reported) == trainer.losses
        expect(legend.locator(f'li[data-series="{trainer.run_id} loss:sum"]')).to_contain_text(f"{trainer.losses} points")
    # one chart whose uPlot legend names both series
    expect(page.locator(".chart canvas")).to_have_count(1)
    expect(page.locator(".chart .u-legend .u-series").filter(has_text=f"{other.run_id} loss:sum")).to_have_count(1)
    expect(page.locator(".chart .u-legend .u-series").filter(has_text=f"{run.run_id} loss:sum")).to_have_count(1)
    page.locator(".chart").scroll_into_view_if_needed()
    screenshot(page, "run-overlay")

    page.get_by_role("button", name=f"{other.run_id} ✕").click()  # removed again
    expect(legend.locator("li")).to_have_count(1)
    expect(legend).to_contain_text(f"loss:sum: {run.losses} points")


def test_publish_survives_a_reload_and_a_ttl_shows_its_expiry(console_server, run, page):
    sign_in(page, console_server.base_url, hash_route=f"#/runs/{run.run_id}")
    row = page.locator(f'tr[data-checkpoint="{run.sampler_path}"]')
    row.get_by_role("button", name="Publish").click()
    expect(row.locator("td.public")).to_have_text("public")
    page.reload()
    expect(row.locator("td.public")).to_have_text("public")
    listed = rest(console_server, "GET", f"/api/v1/training_runs/{run.run_id}/checkpoints").json()["checkpoints"]
    assert [c["public"] for c in listed if c["tinker_path"] == run.sampler_path] == [True]

    row.get_by_label(re.compile("TTL of")).fill("3600")
    row.get_by_role("button", name="Set TTL").click()
    expect(row.locator("td.expires")).not_to_have_text("never")
    listed = rest(console_server, "GET", f"/api/v1/training_runs/{run.run_id}/checkpoints").json()["checkpoints"]
    assert [bool(c.get("expires_at")) for c in listed if c["tinker_path"] == run.sampler_path] == [True]
    row.get_by_role("button", name="Remove TTL").click()
    expect(row.locator("td.expires")).to_have_text("never")
    screenshot(page, "checkpoints")


def test_the_download_links_fetch_an_adapter_peft_loads(console_server, run, page, model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sign_in(page, console_server.base_url, hash_route=f"#/runs/{run.run_id}")
    row = page.locator(f'tr[data-checkpoint="{run.sampler_path}"]')
    row.get_by_role("button", name="Download").click()
    links = row.locator(".links a")
    expect(links.filter(has_text="adapter_model.safetensors")).to_have_count(1)
    for i in range(links.count()):
        link = links.nth(i)
        response = httpx.get(link.get_attribute("href"), timeout=60)  # signed: no API key
        assert response.status_code == 200
        (tmp_path / link.inner_text()).write_bytes(response.content)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(tmp_path))
    assert any("lora_A" in name for name, _ in adapted.named_parameters())


def test_delete_asks_then_removes_the_row_and_the_files(console_server, run, page):
    doomed = run.client.save_weights_for_sampler("to-delete").result().path
    files = list((console_server.data_dir / "checkpoints" / run.run_id / "sampler_weights").glob("to-delete@*"))
    assert files
    sign_in(page, console_server.base_url, hash_route=f"#/runs/{run.run_id}")
    row = page.locator(f'tr[data-checkpoint="{doomed}"]')
    page.once("dialog", lambda dialog: dialog.dismiss())
    row.get_by_role("button", name="Delete").click()
    expect(row).to_have_count(1)  # dismissed: nothing happens
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Delete").click()
    expect(row).to_have_count(0)
    assert not any(f.exists() for f in files)


def test_the_playground_streams_the_openai_sdks_greedy_completion(console_server, run, page):
    from openai import OpenAI

    sign_in(page, console_server.base_url, hash_route="#/playground")
    page.get_by_label("Model", exact=True).fill(run.sampler_path)
    page.get_by_label("Prompt").fill(PROMPT)
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("16")
    page.get_by_label("Show token logprobs").check()
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_test_id("status-a")).to_contain_text("done")
    shown = page.get_by_test_id("output-a").inner_text()

    client = OpenAI(base_url=console_server.base_url + "/oai/api/v1", api_key=API_KEY)
    expected = client.completions.create(model=run.sampler_path, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    assert shown == expected
    assert page.locator('[data-testid="output-a"] span[title]').count() > 1  # streamed in pieces, each with its logprobs
    screenshot(page, "playground")


def test_compare_mode_shows_the_base_and_the_trained_answers_side_by_side(console_server, run, page):
    sign_in(page, console_server.base_url, hash_route="#/playground")
    page.get_by_label("Compare two models").check()
    page.get_by_label("Model", exact=True).fill(BASE)
    page.get_by_label("Second model").fill(run.sampler_path)
    page.get_by_label("Prompt").fill(PROMPT)
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_test_id("status-a")).to_contain_text("done")
    expect(page.get_by_test_id("status-b")).to_contain_text("done")
    base_answer = page.get_by_test_id("output-a").inner_text()
    trained_answer = page.get_by_test_id("output-b").inner_text()
    assert "purple" in trained_answer and base_answer != trained_answer  # the fine-tuned word shows up
    screenshot(page, "compare")


def test_server_page_shows_each_engine(console_server, run, page):
    sign_in(page, console_server.base_url, hash_route="#/server")
    engine = page.locator(f'tr[data-engine="{BASE}"]')
    expect(engine).to_contain_text("cpu")
    expect(engine).to_contain_text("float32")
    expect(page.locator("dl.facts")).to_contain_text("0.1.0")
    screenshot(page, "server")
