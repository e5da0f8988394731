"""``byteswarm train``: one model, one machine, AdamW — the quality ceiling that the
distributed algorithms are compared with.

Writes DIR/metrics.jsonl, DIR/summary.json, DIR/loss.png and DIR/checkpoint.pt. Running
again with the same --out resumes from the checkpoint (exactly: batches are a function of
the step, and the optimizer state is saved); SIGINT/SIGTERM checkpoint before exiting.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from byteswarm.optim import config as C
from byteswarm.optim.data import DataConfig
from byteswarm.optim.files import (
    MetricsLog,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    save_json,
)
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.task import Job, TaskConfig
from byteswarm.optim.train import LocalTrainer, TrainConfig
from byteswarm.optim.workload import make_task
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .plots import plot_lines

SECTIONS = {"task": TaskConfig, "model": ModelConfig, "data": DataConfig,
            "train": TrainConfig}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train one model locally with AdamW (the single-machine baseline)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder for metrics, summary, plot and checkpoint")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with [task], [model], [data] and [train] tables; flags "
                   "override it ([model] and [data] describe the built-in task)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore a checkpoint in DIR and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, cls in SECTIONS.items():
        C.add_arguments(p, cls, title=f"{name} options")
    p.set_defaults(func=run)


def load_configs(args: argparse.Namespace) -> tuple[TaskConfig, ModelConfig, DataConfig,
                                                     TrainConfig]:
    file = C.load_tables(args.config, list(SECTIONS))
    return tuple(C.resolve(cls, args, file.get(name), where=name)  # type: ignore[return-value]
                 for name, cls in SECTIONS.items())


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._set)

    def _set(self, signum: int, _frame: object) -> None:
        self.signal = signum


def run(args: argparse.Namespace) -> int:
    kcfg, mcfg, dcfg, tcfg = load_configs(args)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    configs = {"task": C.to_dict(kcfg), "model": C.to_dict(mcfg.resolved()),
               "data": C.to_dict(dcfg), "train": C.to_dict(tcfg)}

    work = make_task(kcfg, mcfg, dcfg, tcfg.seed)
    trainer = LocalTrainer(Job.of(work, 0, 1, device=kcfg.device, dtype=kcfg.dtype), tcfg)
    resume_step = None
    if ckpt_path.exists() and not args.fresh:
        state = load_checkpoint(ckpt_path)
        if state.get("configs") != configs:
            raise C.ConfigError(f"{out} holds a run with a different configuration; "
                                "use another --out, or --fresh to overwrite it")
        trainer.load_state_dict(state["trainer"])
        resume_step = trainer.step_count
    log = MetricsLog(out / "metrics.jsonl", resume_step=resume_step)
    stop = StopFlag()

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {"configs": configs, "trainer": trainer.state_dict()})

    t0 = time.perf_counter()
    elapsed_before = float(state.get("seconds", 0.0)) if resume_step else 0.0
    val_loss = None
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                  TimeRemainingColumn(), disable=args.quiet) as bar:
        task = bar.add_task("train", total=tcfg.steps, completed=trainer.step_count, info="")
        while trainer.step_count < tcfg.steps and stop.signal is None:
            loss = trainer.step()
            s = trainer.step_count
            row = {"step": s, "loss": round(loss, 6)}
            if s % tcfg.eval_every == 0 or s == tcfg.steps:
                val_loss = trainer.evaluate()
                row["val_loss"] = round(val_loss, 6)
            if s % tcfg.log_every == 0 or "val_loss" in row:
                row["seconds"] = round(elapsed_before + time.perf_counter() - t0, 3)
                log.write(row)
            if s % tcfg.checkpoint_every == 0 or s == tcfg.steps:
                checkpoint()
            info = f"loss {loss:.3f}" + (f"  val {val_loss:.3f}" if val_loss else "")
            bar.update(task, completed=s, info=info)
    if stop.signal is not None:
        checkpoint()
        log.close()
        print(f"stopped by signal {stop.signal} at step {trainer.step_count}; "
              f"checkpoint saved, run again with --out {out} to resume")
        return 128 + stop.signal
    log.close()
    seconds = elapsed_before + time.perf_counter() - t0
    summary = {"final_val_loss": val_loss if val_loss is not None else trainer.evaluate(),
               "steps": trainer.step_count, "params": trainer.params,
               "seconds": round(seconds, 3), "task_name": work.name,
               "device": str(trainer.job.device), **configs}
    save_json(out / "summary.json", summary)
    rows = read_metrics(out / "metrics.jsonl")
    train_pts = [(r["step"], r["loss"]) for r in rows]
    val_pts = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    plot_lines(out / "loss.png", {"train (batch)": tuple(zip(*train_pts)),
                                  "validation": tuple(zip(*val_pts))},
               xlabel="step", ylabel="loss (nats)",
               title=f"byteswarm train: {work.name}, {trainer.params:,} parameters")
    print(f"final validation loss {summary['final_val_loss']:.4f} nats after "
          f"{trainer.step_count} steps in {seconds:.1f} s -> {out}")
    return 0
