"""The web console: static HTML, CSS and JavaScript modules that tinkerd serves at /console/.

Nothing here runs in Python; the files in `static/` are one more client of the REST, metrics
and OpenAI routes. `static/vendor/` holds third-party files pinned by `vendor.json`
(refreshed and verified by tools/vendor_console.py: make vendor-console).
"""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
