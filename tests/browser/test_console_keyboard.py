"""The console's main actions with the keyboard alone: sign in, open a run, go to the
playground and send a prompt, with a visible focus ring on each control reached by Tab."""

from __future__ import annotations

import pytest
from console_testing import API_KEY, screenshot
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MAX_TABS = 40  # more presses than any page has controls before the one sought

# The focused element, whether it matches a selector, and how its focus is drawn.
FOCUSED = """(selector) => {
  const element = document.activeElement;
  const style = getComputedStyle(element);
  return {
    matches: element.matches(selector),
    visible: element.matches(":focus-visible"),
    outline: `${style.outlineStyle} ${style.outlineWidth} ${style.outlineColor}`,
    outlineWidth: parseFloat(style.outlineWidth),
    outlineStyle: style.outlineStyle,
    describe: element.tagName + (element.getAttribute("aria-label") ? `[${element.getAttribute("aria-label")}]` : "") + ` ${element.textContent.trim().slice(0, 40)}`,
  };
}"""


def tab_to(page, selector: str, key: str = "Tab") -> None:
    """Press Tab (or Shift+Tab) until `selector` has the focus, and check that it shows."""
    path = []
    for _ in range(MAX_TABS):
        page.keyboard.press(key)
        focused = page.evaluate(FOCUSED, selector)
        path.append(focused["describe"])
        if focused["matches"]:
            assert focused["visible"] and focused["outlineStyle"] != "none" and focused["outlineWidth"] >= 2, \
                f"focus on {selector} is not drawn: {focused['outline']}"
            return
    raise AssertionError(f"{key} never reached {selector}; it went through {path}")


def test_sign_in_open_a_run_and_send_a_prompt_with_the_keyboard_alone(console_server, run, page):
    page.goto(console_server.base_url + "/console/#/runs")
    expect(page.get_by_label("API key")).to_be_focused()  # the page starts where the user types
    page.keyboard.type(API_KEY)
    page.keyboard.press("Enter")
    run_link = f'tr[data-run="{run.run_id}"] a'
    expect(page.locator(run_link)).to_be_visible()

    tab_to(page, run_link)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name=f"Run {run.run_id}")).to_be_visible()
    expect(page.get_by_test_id("series")).to_contain_text("loss:sum")
    tab_to(page, 'input[type="checkbox"][value="loss:sum"]')  # Tab goes on into the run page
    tab_to(page, 'nav a[data-page="playground"]', key="Shift+Tab")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Playground")).to_be_visible()

    tab_to(page, 'input[aria-label="Model"]')
    page.keyboard.press("Control+a")
    page.keyboard.type(run.sampler_path)
    tab_to(page, 'textarea[aria-label="Prompt"]')
    page.keyboard.type("Zebras drink")
    tab_to(page, 'input[aria-label="Temperature"]')
    page.keyboard.press("Control+a")
    page.keyboard.type("0")
    tab_to(page, 'input[aria-label="Max tokens"]')
    page.keyboard.press("Control+a")
    page.keyboard.type("4")
    tab_to(page, 'textarea[aria-label="Prompt"]', key="Shift+Tab")
    page.keyboard.press("Control+Enter")
    expect(page.get_by_test_id("status-a")).to_contain_text("done")
    assert page.get_by_test_id("output-a").inner_text()
    screenshot(page, "keyboard-playground")

    tab_to(page, 'button[type="submit"]')  # Send, reached by Tab and pressed with Enter, asks again
    with page.expect_response(lambda response: response.url.endswith("/oai/api/v1/completions")) as answered:
        page.keyboard.press("Enter")
    assert answered.value.ok
    expect(page.get_by_test_id("status-a")).to_contain_text("done")
