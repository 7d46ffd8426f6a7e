"""The benchmark scripts' CPU self-checks: the layers they time compute what a per-token
reference computes (bench/grouped_mm_layer.py's plain PyTorch layer and bench/binding_layer.py's
switchyard.moe layer, with the same weights)."""
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench")


@pytest.mark.parametrize("script", ["grouped_mm_layer.py", "binding_layer.py"])
def test_cpu_self_check(script):
    r = subprocess.run([sys.executable, os.path.join(BENCH, script), "--check-cpu"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout
