"""The console's vendored uPlot is exactly what its manifest pins, license included."""

from __future__ import annotations

import importlib.util
import json

from tinkerd_testing import REPO


def load_vendor_tool():
    spec = importlib.util.spec_from_file_location("vendor_console", REPO / "tools" / "vendor_console.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vendored_files_match_the_manifest():
    tool = load_vendor_tool()
    manifest = json.loads(tool.MANIFEST.read_text())
    assert manifest["package"] == "uplot" and manifest["version"] and manifest["license"] == "MIT"
    assert manifest["integrity"].startswith("sha512-")
    assert set(manifest["files"]) == {"uPlot.esm.js", "uPlot.min.css", "uPlot.LICENSE"}
    assert tool.verify() == []
    assert "MIT" in (tool.VENDOR_DIR / "uPlot.LICENSE").read_text() or "Permission is hereby granted" in (tool.VENDOR_DIR / "uPlot.LICENSE").read_text()
