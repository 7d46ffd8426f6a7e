"""Shared helpers for the binding's tests (run with Debian's /usr/bin/python3 -m pytest)."""

import json
import os

import pytest
import torch

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "data")
GOLDEN = os.path.join(DATA, "tutel_v0.3.3_cpu_f32.jsonl")


# The devices a test runs on: cuda where torch sees a GPU (the binding must then have been built
# with CUDA: a CPU-only build fails those tests rather than skipping them).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch sees no GPU"))]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no GPU")


def rel_l2(a, b):
    """||a - b|| / ||b|| in f64 on the host (DESIGN.md §7's measure of test error)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def golden_cases():
    with open(GOLDEN) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
