"""byteswarm.Optimizer: a user's own model and loop, trained with a swarm of real nodes.

The two-peer tests run examples/optimizer_loop.py (what a user runs) as two real
processes on 127.0.0.1, each with its DHT process and p2pd.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import byteswarm
import pytest
import torch
import torch.nn.functional as F
from byteswarm.optim.config import ConfigError
from test_node import CHILD_ENV
from torch import nn

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "optimizer_loop.py"


def start(out: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = out.with_suffix(".log")
    env = {**CHILD_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--out", str(out), *args],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return proc, log


def maddr_of(log: Path, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            if "listening on " in line:
                return line.split("listening on ")[1].strip()
        time.sleep(0.2)
    raise AssertionError(f"no address from the first peer:\n{log.read_text()[-2000:]}")


def run_pair(tmp_path: Path, algo: str, steps: int) -> list[dict]:
    common = ["--algo", algo, "--steps", str(steps), "--peers", "2"]
    a, log_a = start(tmp_path / "a", *common, "--data-seed", "1")
    try:
        b, log_b = start(tmp_path / "b", *common, "--data-seed", "2",
                         "--initial-peers", maddr_of(log_a, a))
        results = []
        for proc, log in ((a, log_a), (b, log_b)):
            assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
            results.append(json.loads(log.read_text().strip().splitlines()[-1]))
        return results
    finally:
        for p in (a,):
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_noloco_trains_a_users_model_in_two_real_nodes(tmp_path):
    res = run_pair(tmp_path, "noloco", 60)
    for r in res:
        assert r["done"] == 60 and r["position"] == 60
        assert r["val_loss"] < 0.6 * r["first_val_loss"], r
    # Two peers average with each other every round: after the last round they agree.
    assert res[0]["val_loss"] == pytest.approx(res[1]["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_spsa_with_a_closure_keeps_two_real_nodes_bit_identical(tmp_path):
    res = run_pair(tmp_path, "spsa", 80)
    for r in res:
        assert r["done"] == 80
        assert r["val_loss"] < r["first_val_loss"] - 0.2, r
    assert res[0]["fingerprint"] == res[1]["fingerprint"]
    assert res[0]["val_loss"] == res[1]["val_loss"]


def test_bad_parameters_are_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="fp32"):
        byteswarm.Optimizer([nn.Parameter(torch.zeros(3, dtype=torch.float16))])
    with pytest.raises(ConfigError, match="parameter groups"):
        byteswarm.Optimizer([{"params": [nn.Parameter(torch.zeros(3))]}])
    with pytest.raises(ConfigError, match="algo"):
        byteswarm.Optimizer([nn.Parameter(torch.zeros(3))], algo="adam")
    with pytest.raises(ConfigError, match="inner_steps"):
        byteswarm.Optimizer([nn.Parameter(torch.zeros(3))], config={"inner_steps": -1})


@pytest.mark.slow
def test_a_lone_optimizer_steps_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    w0 = model.weight.detach().clone()
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    node = {"heartbeat_period": 0.5, "checkpoint_every": 5}
    with byteswarm.Optimizer(model.parameters(), algo="spsa", swarm="solo", node=node,
                             out=tmp_path / "run", config={"lr": 0.05}) as opt:
        with pytest.raises(ValueError, match="closure"):
            opt.step()
        for _ in range(7):
            opt.step(lambda: F.cross_entropy(model(x), y))
        assert opt.position == 7
        fp = opt.algorithm.fingerprint()
    assert not torch.equal(model.weight, w0)  # the user's own parameters trained
    trained = model.weight.detach().clone()
    with pytest.raises(byteswarm.SwarmError, match="closed"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    # A new process would build the model afresh; resuming puts the replica back.
    torch.manual_seed(0)
    again = nn.Linear(4, 2)
    with byteswarm.Optimizer(again.parameters(), algo="spsa", swarm="solo", node=node,
                             out=tmp_path / "run", config={"lr": 0.05}) as opt2:
        assert opt2.position == 7 and opt2.algorithm.fingerprint() == fp
        assert torch.equal(again.weight, trained)
