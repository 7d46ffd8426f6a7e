"""Shared helpers for the binding's tests (run with Debian's /usr/bin/python3 -m pytest)."""

import json
import os

import pytest
import torch

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "data")
GOLDEN = os.path.join(DATA, "tutel_v0.3.3_cpu_f32.jsonl")


def golden_cases():
    with open(GOLDEN) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
