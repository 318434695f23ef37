"""What the console shows when the world changes under an open page: the server goes away,
comes back accepting another key, or a checkpoint is deleted by another client. Each case
must end in a message the user can read (and a way on), never a blank page."""

from __future__ import annotations

import pytest
from console_testing import API_KEY, rest, screenshot, sign_in
from playwright.sync_api import expect

from tinkerd_testing import Server

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_a_server_gone_then_back_with_another_key_shows_messages_not_a_blank_page(model_dir, tmp_path, page):
    data_dir = tmp_path / "data"
    srv = Server(model_dir, data_dir, ["--api-key", API_KEY]).start()
    try:
        sign_in(page, srv.base_url, hash_route="#/server")  # the server page refreshes itself every few seconds
        expect(page.locator("dl.facts")).to_contain_text("Uptime")
    finally:
        srv.stop()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("cannot reach the tinkerd server")
    expect(page.get_by_role("heading", name="Server")).to_be_visible()  # what was shown stays
    screenshot(page, "server-gone")

    # The same server restarted with another key: the key this tab holds is now revoked.
    revoked = Server(model_dir, data_dir, ["--api-key", "tml-the-new-key"], port=srv.port).start()
    try:
        expect(alert).to_contain_text("no longer accepts this API key")
        expect(page.get_by_label("API key")).to_be_visible()
        assert page.evaluate("() => sessionStorage.getItem('tinkerd.apiKey')") is None  # the refused key is forgotten
        screenshot(page, "key-revoked")
        sign_in(page, revoked.base_url, key="tml-the-new-key", hash_route="#/server")  # and the new one works
        expect(page.locator("dl.facts")).to_contain_text("Uptime")
        expect(alert).to_be_hidden()
    finally:
        revoked.stop()


def test_a_key_replaced_in_the_tab_mid_session_is_refused_with_a_message(console_server, run, page):
    sign_in(page, console_server.base_url, hash_route=f"#/runs/{run.run_id}")
    expect(page.get_by_test_id("series")).to_contain_text("loss:sum")
    page.evaluate("() => sessionStorage.setItem('tinkerd.apiKey', 'tml-not-this-one')")
    page.get_by_role("link", name="Runs").click()
    expect(page.get_by_role("alert")).to_contain_text("no longer accepts this API key")
    expect(page.get_by_label("API key")).to_be_visible()


def test_a_checkpoint_deleted_meanwhile_shows_a_message_and_leaves_the_list(console_server, run, page):
    doomed = run.client.save_weights_for_sampler("deleted-meanwhile").result().path
    sign_in(page, console_server.base_url, hash_route=f"#/runs/{run.run_id}")
    row = page.locator(f'tr[data-checkpoint="{doomed}"]')
    expect(row).to_be_visible()
    kind_and_name = doomed.split("/", 3)[3]
    rest(console_server, "DELETE", f"/api/v1/training_runs/{run.run_id}/checkpoints/{kind_and_name}").raise_for_status()

    alert = page.get_by_role("alert")
    row.get_by_role("button", name="Download").click()
    expect(alert).to_contain_text(f"{doomed} no longer exists")
    row.get_by_role("button", name="Publish").click()
    expect(alert).to_contain_text(f"{doomed} no longer exists")
    expect(row).to_have_count(0)  # the list was read again
    expect(page.locator(f'tr[data-checkpoint="{run.sampler_path}"]')).to_be_visible()  # the rest of the page stays
    expect(page.get_by_test_id("series")).to_contain_text("loss:sum")
    screenshot(page, "checkpoint-deleted-meanwhile")
