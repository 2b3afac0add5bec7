"""Shared fixtures. Real offline models are loaded once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import ARCHITECTURES, MOE_ARCHITECTURES, tiny_handle

from steer.models import ModelHandle, load_model

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session", params=ARCHITECTURES)
def tiny(request: pytest.FixtureRequest) -> ModelHandle:
    """A tiny random model per supported architecture."""
    return tiny_handle(request.param)


@pytest.fixture(scope="session", params=MOE_ARCHITECTURES)
def tiny_moe(request: pytest.FixtureRequest) -> ModelHandle:
    """A tiny random mixture-of-experts model per supported MoE architecture."""
    return tiny_handle(request.param)


@pytest.fixture(scope="session")
def tiny_llama() -> ModelHandle:
    return tiny_handle("llama")


@pytest.fixture(scope="session")
def smollm2() -> ModelHandle:
    """The real SmolLM2-135M-Instruct from its PyPI package (float32)."""
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen() -> ModelHandle:
    """The real Qwen2.5-Coder-0.5B-Instruct, assembled from its part packages (float32)."""
    return load_model("qwen2.5-coder-0.5b-instruct")
