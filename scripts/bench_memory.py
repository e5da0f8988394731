"""Peak memory of one training step: inference, seeded SPSA and AdamW (issue 12).

Zeroth-order training needs no gradients, no activations kept for a backward pass and no
optimizer moments, so its step should cost little more than inference (MeZO, Malladi et al.
2023, arXiv 2305.17333, trains a 30B model where backprop fits 2.7B). This measures what
*our* SPSA object costs, against a forward pass and an AdamW step of the same model on
the same batch:

    python scripts/bench_memory.py                    # a table, medium preset
    python scripts/bench_memory.py --json             # one JSON object
    python scripts/bench_memory.py --preset tiny --batch 2 --repeats 1   # a smoke test

The three modes, each built through the project's own code from one ``load_workload``:

``inference``  ``Job.of`` builds the model; one ``job.loss(batch)`` under ``no_grad``.
``spsa``       ``ALGOS["spsa"].make(...)`` for a lone peer, then ``on_local_step(0.0)``:
               two perturbed forward passes, the byte, and the step closing (θ updated).
``adamw``      ``LocalTrainer`` (optim/train.py) on a ``Job``: forward, backward, gradient
               clipping, ``AdamW.step``. Plain AdamW is the cheapest backprop optimizer
               here; NoLoCo and DiLoCo hold φ and an outer momentum on top of it.

Each measurement runs in a fresh process (the script calls itself with ``--one MODE``):
a process's peak only goes up, so modes measured in one process would see each other's.

What counts, and the baseline
-----------------------------
Every mode's window starts after the same setup: ``import torch`` and byteswarm, the corpus
loaded, the batch built, and the mode run once on the tiny preset (see below). The resident
set size at that point is the **baseline**; the window then builds the model (and the
optimizer's state) and runs one step. We report

- ``*_bytes``: the process's total peak RSS (interpreter, torch, corpus and all);
- ``*_above_baseline_bytes``: the peak during the window minus the baseline, i.e. the
  memory that grows with the model: weights, optimizer state, activations, temporaries;
- ``*_held_bytes``: RSS after the step minus the baseline: what stays between steps.

The ratios ``spsa_over_inference`` and ``adamw_over_inference`` divide above-baseline
peaks. That is the honest one for the claim: the baseline (250-470 MB of interpreter,
libraries and corpus on CPU) does not grow with the model, and on a GPU, where the
comparison matters, it does not sit in device memory at all. Total ratios are reported too
(``*_total_over_inference``); they shrink towards 1 as the model shrinks.

Fixed costs go in the baseline, which is why each mode first runs once on the tiny preset:
what a first use costs whatever the model's size lands there, not in the window. Building
``torch.optim.AdamW`` imports some 900 modules (about 110 MB, which would otherwise count
as AdamW's); SPSA's kernels are compiled (``torch.compile`` on CPU, Triton on CUDA; some
210 MB of compiler, and the graphs are dynamic in size, so the real step reuses them);
libtorch's code pages are touched. The compiler stays in spsa's total, not its ratio.

How the peak is read. On Linux we reset the kernel's high-water mark at the baseline
(``echo 5 > /proc/self/clear_refs``) and read ``VmHWM`` after the step, so the peak is the
window's own; elsewhere ``getrusage(RUSAGE_SELF).ru_maxrss``, the process's lifetime peak
(``peak_source`` says which). RSS counts touched pages: an ``empty`` tensor never written
costs nothing on CPU. The child runs with glibc's mmap threshold fixed at 128 KiB
(``MALLOC_MMAP_THRESHOLD_``): left sliding, glibc raises it after the first large free, and
later tensors come from a heap that keeps freed memory, so RSS would depend on the order
of allocations, not on what the step holds (medium, batch 8: 43 MB more on inference's
peak, 55 MB more held after it).

On CUDA (``--device cuda``, or ``auto`` with a GPU) the same window is read from
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; the baseline is
``memory_allocated`` then (tensors only: no context, no allocator cache). Allocations
count whether written or not there.

Machines are noisy: modes are measured in alternation, ``--repeats`` times each; the JSON
gives medians and each mode's min/max above baseline.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace

MODES = ("inference", "spsa", "adamw")
MMAP_THRESHOLD = 128 * 1024  # bytes; see the module docstring
MAX_BYTES = 2_000_000  # corpus bytes read: enough for any preset's context
BATCH = 32  # DataConfig's default batch_size, what a run uses unless told otherwise


# --- reading memory -----------------------------------------------------------------------

def rss_now() -> int:
    """Resident set size of this process now, in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return maxrss()  # no /proc: the peak so far is the best we have


def maxrss() -> int:
    """Lifetime peak RSS in bytes (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where we cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm() -> int:
    """Peak RSS since the last ``reset_hwm``, in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def settle() -> None:
    """Free what can be freed before a reading: garbage, and glibc's free heap pages."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


# --- the modes: each builds its objects inside the window and returns the step ----------

def step_inference(w, dev):
    import torch
    from byteswarm.optim.task import Job

    job = Job.of(w, 0, 1, device=dev)

    def step() -> None:
        with torch.no_grad():
            job.loss(job.data.batch(0)).item()
    return step


def step_spsa(w, dev):
    from byteswarm.optim.workload import ALGOS

    entry = ALGOS["spsa"]
    algo = entry.make(entry.config_cls(finality_steps=1), "p0", 0, 1, ["p0"], w, device=dev)
    return lambda: algo.on_local_step(0.0)


def step_adamw(w, dev):
    from byteswarm.optim.task import Job
    from byteswarm.optim.train import LocalTrainer, TrainConfig

    trainer = LocalTrainer(Job.of(w, 0, 1, device=dev), TrainConfig())
    return trainer.step


STEPS = {"inference": step_inference, "spsa": step_spsa, "adamw": step_adamw}


def warm_up(mode: str, w, dev) -> None:
    """Run ``mode`` once on the tiny preset, so what does not grow with the model lands in
    the baseline: modules imported on first use (building ``torch.optim.AdamW`` imports
    some 900, about 110 MB), code pages of libtorch touched, SPSA's kernels compiled (the
    graphs are dynamic in size, so the real step reuses them)."""
    from byteswarm.optim.model import ModelConfig

    tiny = ModelConfig(preset="tiny")
    step = STEPS[mode](replace(w, model=tiny, seq_len=tiny.resolved().context, val=[]), dev)
    step()


def measure_one(mode: str, preset: str, batch: int, device: str) -> dict:
    """One mode's window in this process (a fresh one: see the module docstring)."""
    import torch
    from byteswarm.optim.data import DataConfig
    from byteswarm.optim.model import ModelConfig, count_params
    from byteswarm.optim.task import resolve_device
    from byteswarm.optim.workload import load_workload

    dev = resolve_device(device)
    w = load_workload(ModelConfig(preset=preset), DataConfig(max_bytes=MAX_BYTES,
                                                             batch_size=batch), seed=0)
    w.batches(0, 1).batch(0)  # the data path warm; every mode's step reads this batch
    warm_up(mode, w, dev)
    cuda = dev.type == "cuda"
    settle()
    pre_peak = maxrss()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        source = "cuda.max_memory_allocated"
    else:
        base = rss_now()
        source = "VmHWM" if reset_hwm() else "ru_maxrss"
    t0 = time.perf_counter()
    step = STEPS[mode](w, dev)  # held until the readings are taken: its state counts
    step()
    seconds = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize(dev)
        peak, held = torch.cuda.max_memory_allocated(dev), torch.cuda.memory_allocated(dev)
        total = peak
    else:
        peak = hwm() if source == "VmHWM" else maxrss()
        held = rss_now()
        total = max(pre_peak, peak)
    del step
    params = count_params(w.build())  # after the readings: a model of its own
    return {"mode": mode, "device": str(dev), "peak_source": source, "baseline_bytes": base,
            "total_bytes": total, "above_baseline_bytes": peak - base,
            "held_bytes": held - base, "seconds": seconds, "params": params,
            "seq_len": w.seq_len}


# --- the parent: fresh processes, modes in alternation ------------------------------------

def run_child(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", mode, "--preset", args.preset,
           "--batch", str(args.batch), "--device", args.device]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"--one {mode} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        # Rotate the order too: a neighbour's burst then lands on a different mode.
        for mode in MODES[r % 3:] + MODES[:r % 3]:
            runs[mode].append(run_child(mode, args))
    first = runs["inference"][0]
    result: dict = {"preset": args.preset, "params": first["params"],
                    "weights_bytes": 4 * first["params"], "device": first["device"],
                    "batch": args.batch, "seq_len": first["seq_len"],
                    "peak_source": first["peak_source"], "repeats": args.repeats}
    med = {}
    for mode, rs in runs.items():
        above = [r["above_baseline_bytes"] for r in rs]
        med[mode] = statistics.median(above)
        result.update({
            f"{mode}_bytes": statistics.median(r["total_bytes"] for r in rs),
            f"{mode}_above_baseline_bytes": med[mode],
            f"{mode}_above_baseline_min": min(above),
            f"{mode}_above_baseline_max": max(above),
            f"{mode}_baseline_bytes": statistics.median(r["baseline_bytes"] for r in rs),
            f"{mode}_held_bytes": statistics.median(r["held_bytes"] for r in rs),
            f"{mode}_seconds": statistics.median(r["seconds"] for r in rs)})
    for mode in ("spsa", "adamw"):
        result[f"{mode}_over_inference"] = med[mode] / med["inference"]
        result[f"{mode}_total_over_inference"] = (result[f"{mode}_bytes"]
                                                  / result["inference_bytes"])
    return result


def print_table(r: dict) -> None:
    mb = 1 / 2**20
    print(f"preset {r['preset']}: {r['params']:,} parameters ({r['weights_bytes'] * mb:.1f} "
          f"MiB fp32), batch {r['batch']} x {r['seq_len']}, {r['device']}, "
          f"peak from {r['peak_source']}, median of {r['repeats']}")
    print(f"{'mode':<11}{'total MiB':>11}{'above base':>12}{'(min-max)':>16}{'held':>9}"
          f"{'x weights':>11}{'x infer':>9}")
    for m in MODES:
        above = r[f"{m}_above_baseline_bytes"]
        span = f"{r[f'{m}_above_baseline_min'] * mb:.1f}-{r[f'{m}_above_baseline_max'] * mb:.1f}"
        print(f"{m:<11}{r[f'{m}_bytes'] * mb:>11.1f}{above * mb:>12.1f}{span:>16}"
              f"{r[f'{m}_held_bytes'] * mb:>9.1f}{above / r['weights_bytes']:>11.2f}"
              f"{above / r['inference_above_baseline_bytes']:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--preset", default="medium", choices=("tiny", "small", "medium"),
                    help="model preset (default: medium, 57M parameters)")
    ap.add_argument("--batch", type=int, default=BATCH,
                    help=f"sequences per batch (default {BATCH}, a run's default: activations, "
                    "and so the ratios, grow with it)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh processes per mode, in alternation (default 3)")
    ap.add_argument("--device", default="auto",
                    help="auto (CUDA if present, else the CPU), cpu, cuda or cuda:N")
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # the child's side
    args = ap.parse_args()
    if args.batch < 1 or args.repeats < 1:
        ap.error("--batch and --repeats must be at least 1")
    if args.one:
        print(json.dumps(measure_one(args.one, args.preset, args.batch, args.device)))
        return
    result = measure(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
