"""Shared fixtures: a tiny Stable Diffusion built once per test session, a fresh workspace."""

from __future__ import annotations

import os

import pytest

from booth.threads import configure_threads

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# One torch thread per process, set here before anything imports torch (OpenMP reads it only
# then) and inherited by every child a test starts. The tiny model gains ~20% from a second
# thread on a quiet machine, and on a busy one spinning OpenMP threads made the suite 10x
# slower; one thread also gives the same numbers on any CI machine. Exact-resume tests
# need the killed child and the resuming test process at the same count: this gives both the
# same. An explicit OMP_NUM_THREADS or BOOTH_THREADS still wins.
if not any(os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                             "BOOTH_THREADS")):
    os.environ["OMP_NUM_THREADS"] = "1"
configure_threads()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny random SD-1.x pipeline folder (diffusers format), built with seed 0."""
    from booth.dreambooth.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture
def workspace(tmp_path) -> str:
    path = tmp_path / "workspace"
    path.mkdir()
    return str(path)


@pytest.fixture
def tool_context(workspace, tiny_model):
    from booth.tools import ToolContext

    return ToolContext.from_options(workspace=workspace, base_model=tiny_model)
