"""The version matrix as Markdown: one row per call of tests/versions/surface.py, one
column per released client, each cell ok / failed / n/a.

The tier (test_sdk_versions.py) writes each client's results to RESULTS and this table next
to them. `make sdk-versions-docs` (or `python tests/versions/sdk_table.py`) copies the
table from the latest results into docs/sdk-versions.md and the README's section between
the markers below; the tier checks that both still match what it measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / ".data" / "test-artifacts" / "sdk-versions"
DOC = REPO / "docs" / "sdk-versions.md"
README = REPO / "README.md"
BEGIN, END = "<!-- sdk-versions:begin -->", "<!-- sdk-versions:end -->"
CELL = {"ok": "ok", "n/a": "n/a", "failed": "**failed**"}

DOC_HEAD = """# Released SDK versions

tinkerd serves every released `tinker` client from 0.34 on (there was no 0.37). The tier
in `tests/versions` installs each one into its own small venv (`make sdk-versions`; they
share the dev venv's dependencies) and runs one script, `tests/versions/surface.py`, with
each against one tinkerd: the service, training with a built-in and a custom loss,
sampling with prompt logprobs, checkpoints through `RestClient`, and the `tinker` CLI.
`make test` runs it, the four clients at once (about 105 CPU-seconds, clients and server
together, so a minute or two on an idle 2-core machine; building the venvs adds about 15 s
each, once); `make test-fast` leaves it out.

A call is **n/a** where that client has no such API (the script looks for the method);
every other call must be **ok**, or the tier fails. What the older clients send
differently, and how tinkerd answers them, is in
[wire-protocol.md §8](wire-protocol.md#8-older-clients).

"""


def load_results(directory: Path = RESULTS) -> dict[str, list[dict]]:
    """{client version: its calls, in order}, oldest version first."""
    results = {}
    for path in directory.glob("tinker-*.json"):
        data = json.loads(path.read_text())
        results[data["tinker"]] = data["calls"]
    return dict(sorted(results.items(), key=lambda kv: tuple(int(p) for p in kv[0].split("."))))


def render(results: dict[str, list[dict]]) -> str:
    """The Markdown table; calls in the order the script makes them."""
    calls: list[str] = []
    for entries in results.values():
        calls += [e["call"] for e in entries if e["call"] not in calls]
    status = {(v, e["call"]): e["status"] for v, entries in results.items() for e in entries}
    lines = ["| call | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for call in calls:
        cells = [CELL.get(status.get((v, call), ""), "–") for v in results]
        lines.append(f"| `{call}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def readme_table(readme: str) -> str | None:
    """The table between the README's markers, or None without them."""
    if BEGIN not in readme or END not in readme:
        return None
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_docs(table: str) -> None:
    DOC.write_text(DOC_HEAD + table)
    readme = README.read_text()
    if readme_table(readme) is None:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} section to fill")
    head, rest = readme.split(BEGIN, 1)
    README.write_text(head + BEGIN + "\n" + table + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    found = load_results()
    if not found:
        sys.exit(f"no results in {RESULTS}: run the tier first (make test-sdk-versions)")
    write_docs(render(found))
    print(f"wrote {DOC.relative_to(REPO)} and the README's table ({', '.join(found)})")
