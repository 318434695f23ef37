"""The web console's routes: its static files at /console/, `/` redirecting there, and
one JSON route with the server's state (GET /api/v1/server_status).

The console's files need no API key (the key is typed into the page and sent by its
scripts on every call); their responses carry a Content-Security-Policy of
`default-src 'self'`, so the browser runs nothing that does not come from tinkerd.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from tinkerd.console import STATIC_DIR
from tinkerd.core.service import Service

if TYPE_CHECKING:
    from tinkerd.engine.client import EngineClient

CONSOLE_PREFIX = "/console"
CONTENT_SECURITY_POLICY = "default-src 'self'"


def is_console_path(path: str) -> bool:
    return path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")


def tinkerd_version() -> str:
    try:
        return version("tinkerd")
    except PackageNotFoundError:
        return "unknown"


def resident_memory_bytes() -> int | None:
    """This process's resident set (Linux), which holds the CPU engines' weights too."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def directory_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass  # removed while we walked (a janitor delete, a checkpoint rename)
    return total


def engine_json(name: str, engine: EngineClient) -> dict[str, Any]:
    stats = engine.stats()
    return {
        "base_model": name,
        "max_context": engine.info.max_context,
        "device": stats.device,
        "dtype": stats.dtype,
        "queued_jobs": stats.queued_jobs,
        "samples_waiting": stats.samples_waiting,
        "sample_rows_running": stats.sample_rows_running,
        "adapters_trainable": stats.adapters_trainable,
        "adapters_cached": stats.adapters_cached,
        "memory_bytes": stats.memory_bytes,
    }


def mount_console(app: FastAPI, service: Service) -> None:
    started = time.monotonic()

    @app.middleware("http")
    async def content_security_policy(request: Request, call_next):
        response = await call_next(request)
        if is_console_path(request.url.path):
            response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
            response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(CONSOLE_PREFIX + "/")

    router = APIRouter(prefix="/api/v1")

    @router.get("/server_status")
    async def server_status() -> dict[str, Any]:
        """tinkerd extension: each engine's state, memory, the data dir's disk, uptime and version."""
        disk = shutil.disk_usage(service.data_dir)
        data_dir_bytes = await asyncio.to_thread(directory_bytes, service.data_dir)
        return {
            "version": tinkerd_version(),
            "uptime_seconds": round(time.monotonic() - started, 1),
            "process_resident_bytes": resident_memory_bytes(),
            "data_dir": str(service.data_dir),
            "disk": {"data_dir_bytes": data_dir_bytes, "free_bytes": disk.free, "total_bytes": disk.total},
            "sessions_connected": len(service.session_seen),
            "engines": [engine_json(name, engine) for name, engine in service.engines.items()],
        }

    app.include_router(router)
    app.mount(CONSOLE_PREFIX, StaticFiles(directory=STATIC_DIR, html=True), name="console")
