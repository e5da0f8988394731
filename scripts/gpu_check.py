"""Everything that needs a GPU, in one run: kernels, bandwidth, batched simulation, nodes.

Run it whenever a CUDA machine is at hand (issue 12, item 6). On a machine without CUDA
every check is reported as skipped, with the reason, and the exit status is 0.

    python scripts/gpu_check.py            # a table
    python scripts/gpu_check.py --json     # one JSON object on stdout
    python scripts/gpu_check.py --quick    # smaller sizes, fewer steps (about two minutes)
    python scripts/gpu_check.py --only kernels,bandwidth

The checks, each independent of the others (one failing, even by an exception or its
time limit, does not stop the rest):

``kernels``        every Triton kernel (Rademacher perturb and multi-record update, raw
                   ``tl.randint``, the NoLoCo/DiLoCo outer steps, int8 quantise and
                   dequantise) on CUDA against its plain-torch reference on the CPU, bit for
                   bit, over sizes that are not multiples of 32 and one of 10M elements;
``bandwidth``      the perturbation pass as a fraction of the device's copy bandwidth
                   (CUDA events; read + write bytes counted alike for both);
``sim``            ``byteswarm.sim`` with batched inner steps, 8 peers, on CUDA;
``spsa_lockstep``  two SPSA objects, one on CUDA and one on the CPU, fed each other's
                   records: equal fingerprints after every step (and, as a control, a
                   different one once a record is withheld from one of them);
``spsa_nodes``     two real ``byteswarm node`` processes on 127.0.0.1, one ``--device
                   cuda`` and one ``--device cpu``: equal SPSA fingerprints at every step.

Exit status 1 if any check that ran failed. Results go to stderr one line at a time as
checks finish, so a run cut short still leaves what it found. A watchdog thread ends the
run (tracebacks on stderr, node processes killed, the partial report printed, status 1)
if the whole thing outlives ``--time-limit``: a hung kernel fails loudly instead of
eating the machine's lease.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import importlib.metadata
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:  # only for the raw randint kernel below; the package imports triton lazily too
    import triton.language as tl
except ImportError:
    tl = None

CHECKS = ("kernels", "bandwidth", "sim", "spsa_lockstep", "spsa_nodes")
# Seconds each check may take (full, quick); the watchdog's TIME_LIMIT caps their sum.
# Expected on one H200 (estimated from CPU timings, not yet measured): under half of these.
LIMITS = {"kernels": (100, 60), "bandwidth": (40, 30), "sim": (90, 60),
          "spsa_lockstep": (60, 45), "spsa_nodes": (150, 120)}
TIME_LIMIT = 280.0  # the whole run, seconds; the watchdog's default

_live_groups: set[int] = set()  # node process groups, killed by the watchdog if need be


# The kernel checks (a, b) and the shared helpers: scripts/gpu_kernels.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path
from gpu_kernels import (  # noqa: E402
    CheckTimeout,
    check_bandwidth,
    check_kernels,
    error_text,
)

# ---------------------------------------------------------------------------------------
# c. A batched simulation on the device.
# ---------------------------------------------------------------------------------------


@functools.cache
def small_task():
    """The built-in byte-level GPT (tiny preset) on a small corpus: seconds to load."""
    from byteswarm.optim.data import DataConfig
    from byteswarm.optim.model import ModelConfig
    from byteswarm.optim.workload import load_workload

    return load_workload(ModelConfig(), DataConfig(max_bytes=1_000_000, batch_size=8,
                                                   val_batches=2), 0)


def check_sim(dev: str, quick: bool) -> dict[str, Any]:
    from byteswarm.optim.diloco import DiLoCoConfig
    from byteswarm.optim.noloco import NoLoCoConfig
    from byteswarm.sim.runner import SimConfig, run_algorithm
    from byteswarm.sim.scenario import load_scenario

    steps = 10 if quick else 20
    sim = SimConfig(scenario="datacenter", peers=8, steps=steps, eval_every=5, batched=True)
    scenario = load_scenario(sim.scenario)
    out: dict[str, Any] = {"peers": sim.peers, "steps": steps, "scenario": sim.scenario}
    ok = True
    for name, cfg in (("noloco", NoLoCoConfig(inner_steps=5, warmup=2)),
                      ("diloco", DiLoCoConfig(inner_steps=5, warmup=2))):
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        res = run_algorithm(name, cfg, sim, scenario, small_task(), device=dev)
        peak = torch.cuda.max_memory_allocated(dev) - before  # > 0: the models lived there
        val = res.summary["final_val_loss"]
        adopted = (res.summary["batched"] or {}).get("adopted", 0)
        good = val is not None and math.isfinite(val) and adopted >= sim.peers and peak > 0
        ok = ok and good
        out[name] = {"pass": good, "final_val_loss": val, "device": dev,
                     "cuda_peak_bytes": peak, "batched": res.summary["batched"],
                     "val_loss_by_step": [r["val_loss"] for r in res.rows
                                          if r["peer"] == res.rows[0]["peer"]][:10],
                     "seconds": round(time.perf_counter() - t0, 2)}
    return {"status": "pass" if ok else "fail", **out}


# ---------------------------------------------------------------------------------------
# d. SPSA replicas on the device and on the CPU stay bit-identical.
# ---------------------------------------------------------------------------------------


def fingerprints_agree(dev_a: str, dev_b: str, steps: int, *,
                       drop_record_at: int | None = None, task: Any = None) -> dict[str, Any]:
    """Two SPSA peers, A on ``dev_a`` and B on ``dev_b``, stepped in lock step, each fed
    the other's records (tests/test_spsa.py's ``run_lockstep``, for two devices).

    Each peer measures its own byte on its own device (the losses differ in the last bits
    between devices, and that is fine: the byte is what travels); both then apply the same
    records, so θ must be the same bits on both. Returns both fingerprints after the last
    step, the first step after which they differed (None: never) and ``agree``.

    ``drop_record_at``: the control. B never receives A's first nonzero record at or
    after that step (a zero byte moves nothing, so dropping one would prove nothing) and
    closes that step by its timeout, as a node would; the fingerprints must then differ.
    """
    from byteswarm.optim.sansio import EVERYONE
    from byteswarm.optim.spsa import SPSAConfig
    from byteswarm.optim.workload import ALGOS

    task = task if task is not None else small_task()
    cfg = SPSAConfig(swarm="gpu-check")
    ids = ["peer-a", "peer-b"]
    a, b = (ALGOS["spsa"].make(cfg, pid, k, 2, ids, task, device=dev)
            for k, (pid, dev) in enumerate(zip(ids, (dev_a, dev_b))))
    now, first_mismatch, dropped = 0.0, None, None
    for t in range(steps):
        a.on_local_step(now)
        b.on_local_step(now)
        from_a = [s.msg for s in a.outbox() if s.to == EVERYONE]
        from_b = [s.msg for s in b.outbox() if s.to == EVERYONE]
        for m in from_b:
            a.on_message(m.peer, m, now)
        for m in from_a:
            if (drop_record_at is not None and dropped is None and t >= drop_record_at
                    and m.q != 0):
                dropped = {"step": m.step, "q": m.q}
                continue
            b.on_message(m.peer, m, now)
        if not b.can_step():  # waiting for the dropped record: time the step out
            now += cfg.step_timeout
            b.on_timer(now)
        if a.closed != t or b.closed != t:
            raise RuntimeError(f"step {t} did not close: A at {a.closed}, B at {b.closed}")
        if first_mismatch is None and a.fingerprint() != b.fingerprint():
            first_mismatch = t
    fa, fb = a.fingerprint(), b.fingerprint()
    return {"devices": [dev_a, dev_b], "steps": steps, "fingerprints": [fa, fb],
            "agree": fa == fb, "first_mismatch_step": first_mismatch, "dropped": dropped,
            "records_applied": [a.stats()["records_applied"], b.stats()["records_applied"]]}


def check_spsa_lockstep(dev: str, quick: bool) -> dict[str, Any]:
    steps = 10 if quick else 30
    same = fingerprints_agree(dev, "cpu", steps)
    control = fingerprints_agree(dev, "cpu", 4, drop_record_at=1)
    ok = same["agree"] and same["first_mismatch_step"] is None and not control["agree"]
    return {"status": "pass" if ok else "fail", **same,
            "control_with_a_dropped_record_differs": not control["agree"],
            "control": control}


# ---------------------------------------------------------------------------------------
# d'. The same between two real node processes.
# ---------------------------------------------------------------------------------------


def node_fingerprints(devices: tuple[str, str], steps: int, timeout: float) -> dict[str, Any]:
    """Run two SPSA nodes (A on ``devices[0]``, B on ``devices[1]``) to ``steps`` and compare
    their fingerprints at every step both logged, and at the end. The process plumbing is
    scripts/node_procs.py's (each node in its own process group, killed whatever happens)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from node_procs import COMMON, Node

    work = Path(tempfile.mkdtemp(prefix="gpu_check_nodes_"))
    config = work / "spsa.toml"
    # A long step timeout: the first CUDA forward pass (cuBLAS set-up) must not time a step
    # out, or the rows would compare a replica from before the late record's replay.
    config.write_text("[spsa]\nstep_timeout = 60.0\n")
    args = [*COMMON, "--batch-size", "8", "--start-timeout", "90", "--config", str(config),
            "--algo", "spsa", "--steps", str(steps), "--min-peers", "2",
            "--eval-every", str(steps)]
    deadline = time.monotonic() + timeout
    nodes: list[Node] = []

    def start(name: str, *extra: str) -> Node:
        nodes.append(Node(work / name, [*args, *extra]))
        _live_groups.add(nodes[-1].proc.pid)
        return nodes[-1]

    try:
        a = start("a", "--device", devices[0], "--shard", "0")
        maddr = a.maddr(timeout=deadline - time.monotonic())
        start("b", "--device", devices[1], "--shard", "1", "--initial-peers", maddr)
        for n in nodes:
            try:
                rc = n.proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"node {n.out.name} still running after {timeout:.0f} s:\n"
                                   f"{n.text()[-1500:]}") from None
            if rc != 0:
                raise RuntimeError(f"node {n.out.name} exited {rc}:\n{n.text()[-1500:]}")
        rows = [{r["step"]: r for r in n.rows()} for n in nodes]
        sums = [n.summary() for n in nodes]
    finally:
        for n in nodes:
            n.kill_group()
            _live_groups.discard(n.proc.pid)
        shutil.rmtree(work, ignore_errors=True)
    common_steps = sorted(set(rows[0]) & set(rows[1]))
    differ = [s for s in common_steps
              if rows[0][s].get("fingerprint") != rows[1][s].get("fingerprint")]
    final = [s.get("fingerprint") for s in sums]
    stats = [{k: s["stats"].get(k) for k in ("records_applied", "steps_timed_out",
                                             "late_records", "replays")} for s in sums]
    ok = (not differ and final[0] is not None and final[0] == final[1]
          and sums[0]["steps"] == sums[1]["steps"] == steps and len(common_steps) >= steps
          and stats[0]["records_applied"] == stats[1]["records_applied"])  # same records
    return {"status": "pass" if ok else "fail", "devices": list(devices), "steps": steps,
            "steps_compared": len(common_steps), "steps_differing": differ[:10],
            "final_fingerprints": final, "final_val_loss": [s["final_val_loss"] for s in sums],
            "stats": stats}


def check_spsa_nodes(dev: str, quick: bool) -> dict[str, Any]:
    steps = 12 if quick else 30
    return node_fingerprints((dev, "cpu"), steps, timeout=LIMITS["spsa_nodes"][int(quick)] - 10)


CHECK_FNS: dict[str, Callable[[str, bool], dict[str, Any]]] = {
    "kernels": check_kernels, "bandwidth": check_bandwidth, "sim": check_sim,
    "spsa_lockstep": check_spsa_lockstep, "spsa_nodes": check_spsa_nodes}


# ---------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------


def no_cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return ("torch has no CUDA device here" + ("" if built else
                f" (torch {torch.__version__} is a CPU-only build)"))
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'byteswarm[gpu]')"
    return None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_check(name: str, dev: str, quick: bool, report: dict[str, Any]) -> dict[str, Any]:
    """Run one check under its time limit; an exception or timeout makes it fail, not us."""
    limit = LIMITS[name][int(quick)]

    def on_alarm(_signum, _frame):
        raise CheckTimeout(f"{name} took longer than {limit} s")

    report["running"] = name
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    t0 = time.perf_counter()
    try:
        result = CHECK_FNS[name](dev, quick)
    except BaseException as e:  # CheckTimeout, CUDA errors, our bugs: all reported
        if isinstance(e, KeyboardInterrupt):
            raise
        result = {"status": "fail", "error": error_text(e),
                  "traceback": traceback.format_exc()[-2000:]}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        report["running"] = None
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def summary_line(name: str, r: dict[str, Any]) -> str:
    if r["status"] == "skipped":
        return r["skipped"]
    if "error" in r:
        return r["error"]
    if name == "kernels":
        ks = r["kernels"]
        bad = [k for k, v in ks.items() if not v["pass"]]
        return (f"{len(ks) - len(bad)}/{len(ks)} kernels bit-identical to the CPU reference"
                + (f"; failing: {', '.join(bad)}" if bad else ""))
    if name == "bandwidth":
        g = r["gb_per_s"]
        return (f"copy {g['copy']:.0f} GB/s, perturb {g['perturb']:.0f} GB/s "
                f"(x{r['perturb_over_copy']:.2f} of copy), update_ x8 {g['update_8']:.0f} GB/s")
    if name == "sim":
        return ", ".join(f"{a} val {r[a]['final_val_loss']:.3f} on {r[a]['device']}"
                         for a in ("noloco", "diloco") if a in r)
    if name == "spsa_lockstep":
        return (f"{'equal' if r['agree'] else 'DIFFERENT'} fingerprints after {r['steps']} "
                f"steps ({r['devices'][0]} vs cpu); control with a dropped record "
                f"{'differs' if r['control_with_a_dropped_record_differs'] else 'DOES NOT'}")
    if name == "spsa_nodes":
        return (f"{r['steps_compared']} steps compared, {len(r['steps_differing'])} differ; "
                f"final {r['final_fingerprints'][0]} / {r['final_fingerprints'][1]}")
    return ""


def print_table(report: dict[str, Any]) -> None:
    print(f"gpu_check: cuda {report['cuda']}, device {report['device']}, "
          f"torch {report['torch']}, triton {report['triton']}")
    for name, r in report["checks"].items():
        secs = f"{r['seconds']:6.1f}s" if "seconds" in r else "       "
        print(f"  {name:14s} {r['status']:8s}{secs}  {summary_line(name, r)}")
        for k, v in r.get("kernels", {}).items():
            extra = "; ".join(v.get("failures", [])) or v.get("error", "")
            print(f"      {k:16s} {'pass' if v['pass'] else 'FAIL':5s} {v['cases']:4d} cases"
                  f"  max |diff| {float(v['max_abs_diff']):.3g}  {extra}")
    print("ok" if report["ok"] else "FAILED")


def emit(report: dict[str, Any], as_json: bool) -> None:
    failed = [n for n, r in report["checks"].items() if r["status"] == "fail"]
    report["ok"] = not failed
    report["failed"] = failed
    if as_json:
        print(json.dumps(report, default=str))
    else:
        print_table(report)
    sys.stdout.flush()


def start_watchdog(seconds: float, report: dict[str, Any], as_json: bool) -> threading.Timer:
    """After ``seconds``: tracebacks to stderr, node groups killed, the report printed with
    the running check failed, exit 1. A thread, so it fires even while the main thread is
    stuck in a CUDA call that holds no Python lock."""

    def fire() -> None:
        name = report.get("running")
        print(f"gpu_check: hard time limit of {seconds:.0f} s hit during {name}; "
              "tracebacks follow", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for pgid in list(_live_groups):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if name:
            report["checks"][name] = {"status": "fail",
                                      "error": f"hard time limit of {seconds:.0f} s"}
        emit(report, as_json)
        os._exit(1)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps")
    p.add_argument("--only", default=",".join(CHECKS), metavar="NAMES",
                   help=f"comma-separated checks to run (default: all of {', '.join(CHECKS)})")
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT, metavar="SECONDS",
                   help=f"end the whole run after this long, status 1 (default {TIME_LIMIT:.0f})")
    args = p.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        p.error(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")

    reason = no_cuda_reason()
    if reason is None:
        # The tests' conftest sets TRITON_INTERPRET=1 for CPU runs; here we want the GPU.
        # Triton reads it when a kernel is decorated, which none has been yet.
        os.environ["TRITON_INTERPRET"] = "0"
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "cuda": reason is None,
        "device": torch.cuda.get_device_name(0) if reason is None else None,
        "torch": torch.__version__, "triton": package_version("triton"),
        "quick": args.quick, "checks": {}, "running": None,
        **({"skipped": reason} if reason is not None else {})}
    watchdog = start_watchdog(args.time_limit, report, args.json)
    for name in only:
        if reason is not None:
            result = {"status": "skipped", "skipped": reason}
        else:
            result = run_check(name, "cuda", args.quick, report)
            try:
                torch.cuda.empty_cache()
            except RuntimeError:  # a sticky CUDA error: the next checks will report it
                pass
        report["checks"][name] = result
        print(f"gpu_check: {name} {result['status']}  {json.dumps(result, default=str)}",
              file=sys.stderr, flush=True)
    watchdog.cancel()
    report.pop("running")
    report["seconds"] = round(time.perf_counter() - t0, 2)
    emit(report, args.json)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
