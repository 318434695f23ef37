"""The console's vendored chart library (uPlot, MIT) and its manifest.

    python tools/vendor_console.py refresh [--version X.Y.Z]   # from the npm registry
    python tools/vendor_console.py verify                      # files match the manifest

`refresh` downloads the package tarball from registry.npmjs.org, checks it against the
registry's own `dist.integrity` (sha512), copies the files the console loads plus the
license into src/tinkerd/console/static/vendor/, and writes vendor.json: package, version,
tarball URL and integrity, and the sha256 of every file. `verify` recomputes those sha256s,
so a hand-edited or truncated vendored file fails (also run by tests/unit/test_console_vendor.py).
Standard library only: the Makefile runs it with the system Python.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"
PACKAGE = "uplot"
VENDOR_DIR = Path(__file__).resolve().parents[1] / "src" / "tinkerd" / "console" / "static" / "vendor"
MANIFEST = VENDOR_DIR / "vendor.json"
# tarball member -> vendored name
FILES = {"package/dist/uPlot.esm.js": "uPlot.esm.js", "package/dist/uPlot.min.css": "uPlot.min.css", "package/LICENSE": "uPlot.LICENSE"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def refresh(version: str | None) -> None:
    meta = json.loads(fetch(f"{REGISTRY}/{PACKAGE}/{version or 'latest'}"))
    dist = meta["dist"]
    tarball = fetch(dist["tarball"])
    algorithm, _, expected = dist["integrity"].partition("-")
    if base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode() != expected:
        sys.exit(f"{dist['tarball']}: the download does not match the registry's integrity {dist['integrity']}")
    VENDOR_DIR.mkdir(parents=True, exist_ok=True)
    files = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for member, name in FILES.items():
            data = archive.extractfile(member).read()
            (VENDOR_DIR / name).write_bytes(data)
            files[name] = sha256(data)
    manifest = {"package": PACKAGE, "version": meta["version"], "license": meta.get("license"), "tarball": dist["tarball"],
                "integrity": dist["integrity"], "files": files}
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"vendored {PACKAGE} {meta['version']} into {VENDOR_DIR}")


def verify() -> list[str]:
    """Problems found (empty: every vendored file matches the manifest)."""
    manifest = json.loads(MANIFEST.read_text())
    problems = []
    for name, digest in manifest["files"].items():
        path = VENDOR_DIR / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256(path.read_bytes()) != digest:
            problems.append(f"{name}: sha256 differs from vendor.json")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("refresh").add_argument("--version")
    sub.add_parser("verify")
    args = parser.parse_args()
    if args.command == "refresh":
        refresh(args.version)
    problems = verify()
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)
    print("vendored files match vendor.json")


if __name__ == "__main__":
    main()
