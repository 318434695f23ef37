"""The console at laptop widths: at 1280×800 and 1024×800 no page scrolls sideways and no
visible text is smaller than 12px."""

from __future__ import annotations

import pytest
from console_testing import BASE, screenshot, sign_in
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MIN_FONT_PX = 12

# The document's width beyond the viewport (0: nothing to scroll sideways), and the widest
# element that sticks out, to say what to fix.
OVERFLOW = """() => {
  const root = document.scrollingElement;
  let widest = null;
  for (const node of document.body.querySelectorAll("*")) {
    const right = node.getBoundingClientRect().right;
    if (right > root.clientWidth && (!widest || right > widest.right)) widest = { right, node: node.tagName + "." + node.className };
  }
  return { overflow: root.scrollWidth - root.clientWidth, widest };
}"""

# Every visible piece of text whose computed font size is under the minimum.
SMALL_TEXT = """(minimum) => {
  const small = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let text = walker.nextNode(); text; text = walker.nextNode()) {
    const element = text.parentElement;
    if (!text.textContent.trim() || !element.checkVisibility()) continue;
    const size = parseFloat(getComputedStyle(element).fontSize);
    if (size < minimum) small.push(`${element.tagName}.${element.className} ${size}px: ${text.textContent.trim().slice(0, 40)}`);
  }
  return small;
}"""


def check_layout(page, name: str) -> None:
    measured = page.evaluate(OVERFLOW)
    assert measured["overflow"] <= 0, f"{name} scrolls sideways by {measured['overflow']}px; widest: {measured['widest']}"
    assert page.evaluate(SMALL_TEXT, MIN_FONT_PX) == [], f"{name} has text under {MIN_FONT_PX}px"


@pytest.mark.parametrize("width", [1280, 1024])
def test_every_page_fits_a_laptop_screen_with_readable_text(console_server, run, browser, width):
    context = browser.new_context(viewport={"width": width, "height": 800})
    try:
        page = context.new_page()
        page.goto(console_server.base_url + "/console/#/runs")
        expect(page.get_by_label("API key")).to_be_visible()
        check_layout(page, "sign-in")

        sign_in(page, console_server.base_url, hash_route="#/runs")
        expect(page.locator(f'tr[data-run="{run.run_id}"]')).to_be_visible()
        check_layout(page, "runs")
        screenshot(page, f"runs-{width}")

        page.goto(f"{console_server.base_url}/console/#/runs/{run.run_id}")
        expect(page.locator(".chart canvas")).to_have_count(1)
        expect(page.locator(f'tr[data-checkpoint="{run.sampler_path}"]')).to_be_visible()
        check_layout(page, "run")
        screenshot(page, f"run-{width}")

        page.goto(console_server.base_url + "/console/#/playground")
        page.get_by_label("Compare two models").check()  # the widest form: two model fields
        expect(page.get_by_label("Second model")).to_be_visible()
        check_layout(page, "playground")
        screenshot(page, f"playground-{width}")

        page.goto(console_server.base_url + "/console/#/server")
        expect(page.locator(f'tr[data-engine="{BASE}"]')).to_be_visible()
        check_layout(page, "server")
        screenshot(page, f"server-{width}")
    finally:
        context.close()
