"""The examples run end to end (small sizes): python -m switchyard.examples.NAME."""

import re
import subprocess
import sys


def run(name, *args):
    out = subprocess.run([sys.executable, "-m", f"switchyard.examples.{name}", *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_helloworld_prints_tutels_step_lines():
    out = run("helloworld", "--num_steps", "4", "--batch_size", "2", "--num_tokens", "32",
              "--model_dim", "32", "--hidden_size", "32", "--num_local_experts", "4",
              "--capacity_factor", "0", "--l_aux_wt", "0.01")
    steps = re.findall(r"^STEP-(\d+): loss = ([0-9.]+), step_time = ([0-9.]+) sec, "
                       r"perf = ([0-9.]+) tflops\.$", out, re.M)
    assert [int(s[0]) for s in steps] == [0, 1, 2, 3]
    assert float(steps[-1][1]) < float(steps[0][1])  # SGD on a fixed batch: the loss falls


def test_helloworld_eval_and_lambda_free_dtype():
    out = run("helloworld", "--num_steps", "2", "--batch_size", "1", "--num_tokens", "16",
              "--model_dim", "16", "--hidden_size", "16", "--eval", "--dtype", "float64")
    assert out.count("STEP-") == 2


def test_classifier_accuracy_rises_well_above_chance():
    out = run("classifier", "--epochs", "3", "--train_size", "2000", "--test_size", "500")
    chance = float(re.search(r"chance = ([0-9.]+)", out).group(1))
    accs = [float(a) for a in re.findall(r"test accuracy = ([0-9.]+)", out)]
    assert accs[-1] > chance + 0.5, out
