"""Fixtures shared by the unit tests."""

from __future__ import annotations

import shutil

import pytest

from tinkerd.engine.cpu import kernels as cpu_kernels


@pytest.fixture
def c_kernels() -> cpu_kernels.CpuKernels:
    """The float32 CPU kernels; skipped only where no C compiler can build them (the torch
    path then serves decode steps)."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine: the torch path serves decode steps")
    loaded = cpu_kernels.load()
    assert loaded is not None, "a C compiler is present, so the kernels must build and load"
    return loaded
