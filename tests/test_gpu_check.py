"""scripts/gpu_check.py on a machine without a GPU: it skips cleanly, and the comparison
behind its SPSA check (two replicas fed each other's records) holds on CPU vs CPU and
catches a replica that missed a record."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/gpu_check.py"

no_gpu_only = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="with a GPU the script runs for real (minutes)")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def one_thread():
    # A tiny model gains nothing from threads; on a busy shared machine they spin-wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@no_gpu_only
def test_without_cuda_every_check_is_skipped_with_a_reason(gpu_check):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    assert report["cuda"] is False and report["ok"] is True and report["failed"] == []
    assert list(report["checks"]) == list(gpu_check.CHECKS)
    for name, r in report["checks"].items():
        assert r["status"] == "skipped", name
        assert isinstance(r["skipped"], str) and r["skipped"], name


@no_gpu_only
def test_table_and_unknown_checks(gpu_check, capsys):
    assert gpu_check.main(["--only", "kernels,sim"]) == 0
    out = capsys.readouterr().out
    assert "kernels" in out and "sim" in out and "bandwidth" not in out
    assert out.count("skipped") == 2
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--only", "kernals"])
    assert e.value.code == 2


def test_replicas_on_two_devices_agree_and_a_dropped_record_shows(gpu_check, one_thread):
    """The lock-step comparison of check spsa_lockstep, run CPU vs CPU: it must agree, and
    it must be able to fail (peer B misses one of A's records and times the step out)."""
    from byteswarm.optim.data import DataConfig
    from byteswarm.optim.model import ModelConfig
    from byteswarm.optim.workload import load_workload

    task = load_workload(ModelConfig(), DataConfig(max_bytes=200_000, batch_size=4,
                                                   val_batches=1), 0)
    # The comparison is under test here, not the kernels (tests/test_rademacher.py holds
    # those): run the compiled path's graphs eagerly, same math, without seconds of compiling.
    with torch._dynamo.config.patch(disable=True):
        same = gpu_check.fingerprints_agree("cpu", "cpu", 4, task=task)
        cut = gpu_check.fingerprints_agree("cpu", "cpu", 4, drop_record_at=1, task=task)
    assert same["agree"] and same["first_mismatch_step"] is None
    assert same["records_applied"] == [8, 8] and same["dropped"] is None

    assert not cut["agree"]
    assert cut["dropped"] is not None and cut["dropped"]["q"] != 0
    assert cut["first_mismatch_step"] == cut["dropped"]["step"] >= 1
    assert cut["records_applied"] == [8, 7]
