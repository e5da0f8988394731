"""``byteswarm train`` end to end, as a user runs it: the installed console script."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from byteswarm.optim.files import read_metrics

EXE = shutil.which("byteswarm") or str(Path(sys.executable).with_name("byteswarm"))
FAST = ["--preset", "tiny", "--max-bytes", "3000000", "--quiet"]


def train(*args, check=True, **kw):
    proc = subprocess.run([EXE, "train", *args], capture_output=True, text=True, timeout=300,
                          **kw)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


@pytest.mark.slow
def test_tiny_preset_reaches_the_acceptance_loss(tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    train("--preset", "tiny", "--steps", "300", "--out", str(out), "--quiet")
    assert time.perf_counter() - t0 < 120
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] < 2.6  # uniform guessing is ln 256 = 5.55
    assert summary["steps"] == 300 and 100_000 < summary["params"] < 300_000
    assert {"final_val_loss", "steps", "params", "seconds"} <= set(summary)
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "checkpoint.pt").exists()
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["step"] == 300 and rows[0]["loss"] > rows[-1]["loss"] + 2


def test_same_seed_same_losses_and_another_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        train(*FAST, "--steps", "30", "--log-every", "5", "--seed", seed,
              "--out", str(tmp_path / name))
        runs[name] = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / name /
                                                                   "metrics.jsonl")]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


@pytest.mark.slow
def test_sigterm_checkpoints_and_rerun_resumes_exactly(tmp_path):
    args = [*FAST, "--steps", "120", "--log-every", "1", "--eval-every", "40",
            "--checkpoint-every", "1000"]
    train(*args, "--out", str(tmp_path / "straight"))

    out = tmp_path / "interrupted"
    proc = subprocess.Popen([EXE, "train", *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped_at = read_metrics(metrics)[-1]["step"]
    assert 10 <= stopped_at < 120  # it really stopped mid-run

    train(*args, "--out", str(out))  # resumes from the checkpoint the signal wrote
    losses = lambda d: [(r["step"], r["loss"], r.get("val_loss")) for r in
                        read_metrics(d / "metrics.jsonl")]
    assert losses(out) == losses(tmp_path / "straight")


def test_resume_refuses_a_different_configuration(tmp_path):
    train(*FAST, "--steps", "3", "--out", str(tmp_path))
    proc = train(*FAST, "--steps", "3", "--lr", "0.01", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "different configuration" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps: must be >= 1"),
    (["--steps", "ten"], "invalid int value"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--preset", "huge"], "invalid choice"),
    (["--data", "/nonexistent/corpus"], "neither a file nor a folder"),
])
def test_bad_input_is_one_line_no_traceback(tmp_path, args, message):
    proc = train("--out", str(tmp_path / "x"), *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bad_config_file_values(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nsteps = 3\nwarmpu = 2\n")
    proc = train("--out", str(tmp_path / "x"), "--config", str(cfg), check=False)
    assert proc.returncode == 2 and "unknown key 'warmpu'" in proc.stderr
    cfg.write_text("[trian]\nsteps = 3\n")
    proc = train("--out", str(tmp_path / "x"), "--config", str(cfg), check=False)
    assert proc.returncode == 2 and "unknown table [trian]" in proc.stderr
    cfg.write_text("[train]\nsteps = 2\nlr = 0.01\n[model]\nn_layer = 1\n")
    train("--out", str(tmp_path / "ok"), "--config", str(cfg), *FAST, "--steps", "4")
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["train"]["steps"] == 4 and summary["train"]["lr"] == 0.01  # flag wins
    assert summary["model"]["n_layer"] == 1


def test_help_explains_every_option():
    out = subprocess.run([EXE, "train", "--help"], capture_output=True, text=True).stdout
    for flag in ("--out", "--config", "--preset", "--steps", "--lr", "--data", "--non-iid",
                 "--batch-size", "--seed", "--fresh"):
        assert flag in out
    top = subprocess.run([EXE, "--help"], capture_output=True, text=True).stdout
    assert "train" in top
