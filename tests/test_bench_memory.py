"""scripts/bench_memory.py on the tiny preset: the whole script, its fresh processes and
all, checked against memory any correct reading must see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_memory_sees_what_each_step_must_hold():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_memory.py"), "--json", "--preset", "tiny",
         "--batch", "2", "--repeats", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    for key in ("preset", "params", "device", "batch", "seq_len", "repeats",
                "spsa_over_inference", "adamw_over_inference"):
        assert key in r
    for mode in ("inference", "spsa", "adamw"):
        for suffix in ("bytes", "above_baseline_bytes", "above_baseline_min",
                       "above_baseline_max", "held_bytes"):
            assert f"{mode}_{suffix}" in r
    assert (r["preset"], r["batch"], r["seq_len"], r["device"]) == ("tiny", 2, 64, "cpu")
    weights = 4 * r["params"]
    # The window holds the model in every mode: a reading that missed it (a baseline taken
    # after building, objects freed before the reading) would fail here.
    assert r["inference_above_baseline_bytes"] >= 0.9 * weights
    # AdamW keeps weights, gradients and two moments after its step: at least 4x the
    # weights; 3x leaves room for pages the kernel hands back.
    assert r["adamw_held_bytes"] >= 3 * weights
    assert r["adamw_over_inference"] > 1
    assert r["inference_bytes"] >= r["inference_above_baseline_bytes"]
