"""``byteswarm node``: a long-running peer that trains with others over hivemind.

Without --initial-peers it starts a new swarm and prints the addresses others join with,
one per line, each starting ``byteswarm node: listening on``. With them, it joins; if the
swarm is already ahead it downloads a peer's state first (SPSA replicas must be identical).

Writes to DIR (--out): metrics.jsonl (a row per step: loss, val_loss when evaluated, the
SPSA fingerprint, bytes sent and received in total and by message type, peers seen),
summary.json, checkpoint.pt (every N steps, at the end and on SIGINT/SIGTERM), and the
identity key. Running again with the same --out resumes from the checkpoint.

The node and its helpers (hivemind's DHT process and the p2pd daemon) are torn down on
exit and on SIGTERM. A kill -9 cannot be caught: start the node in its own process group
(``setsid byteswarm node …``) and kill the group.

Algorithm settings go in a TOML file (--config) as [spsa], [noloco] or [diloco] tables,
the node's in [node], what to train in [task] (--task module:attr for your own task,
optim/task.py; --device, --dtype), the built-in task in [model] and [data]. Flags override
the file. Every peer of a swarm must run the same task.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from byteswarm.optim import config as C
from byteswarm.optim.data import DataConfig
from byteswarm.optim.files import MetricsLog, load_checkpoint, save_checkpoint, save_json
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.task import TaskConfig
from byteswarm.optim.workload import ALGOS, WithWeights, make_task, read_weights
from byteswarm.protocols import state as P
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import algos as A
from .driver import Driver, Plan
from .identity import ensure_identity, load_identity
from .procs import start_dht, start_reaper, stop_dht
from .sealing import Sealer
from .settings import LISTS, NodeConfig, join_lists
from .transport import Transport

SECTIONS = {"node": NodeConfig, "task": TaskConfig, "model": ModelConfig, "data": DataConfig}
CHECKPOINT_VERSION = 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="run a peer that trains with others over hivemind",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for metrics, summary, checkpoint and identity")
    p.add_argument("--config", metavar="FILE", help="TOML file with [node], [task], [model], "
                   "[data] and [spsa]/[noloco]/[diloco] tables; flags override it")
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    for name in LISTS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, nargs="+", metavar="MADDR",
                       help=next(f.metadata["help"] for f in dataclasses.fields(NodeConfig)
                                 if f.name == name))
    C.add_arguments(p, NodeConfig, title="node options", skip=LISTS)
    C.add_arguments(p, TaskConfig, title="task options")
    C.add_arguments(p, ModelConfig, title="model options")
    C.add_arguments(p, DataConfig, title="data options")
    p.set_defaults(func=run)


def load_configs(args: argparse.Namespace) -> tuple[NodeConfig, TaskConfig, ModelConfig,
                                                     DataConfig, Any]:
    file = C.load_tables(args.config, sorted(set(SECTIONS) | set(ALGOS)))
    for name in LISTS:
        if isinstance(getattr(args, name, None), list):
            setattr(args, name, " ".join(getattr(args, name)))
    node = C.resolve(NodeConfig, args, join_lists(file.get("node", {})), where="node")
    task = C.resolve(TaskConfig, args, file.get("task"), where="task")
    model = C.resolve(ModelConfig, args, file.get("model"), where="model")
    data = C.resolve(DataConfig, args, file.get("data"), where="data")
    section = dict(file.get(node.algo, {}))
    if node.algo == "spsa":  # SPSA's seeds hang off the swarm name: one name, not two
        if section.setdefault("swarm", node.swarm) != node.swarm:
            raise C.ConfigError(f"spsa: swarm {section['swarm']!r} differs from the node's "
                                f"swarm {node.swarm!r}; set it once, in [node]")
    algo = C.from_mapping(ALGOS[node.algo].config_cls, section, where=node.algo)
    if getattr(algo, "spot_check_rate", 0) > 0 and node.shard >= 0:
        raise C.ConfigError("spsa: spot checks recompute other peers' records on their "
                            "shards, which follow from peer ids only when no --shard is set")
    return node, task, model, data, algo


@dataclasses.dataclass
class Public:
    """What a public swarm adds to a node (node/swarm_cli.py): the signed manifest it keeps
    published, our admission token, and who may contribute."""

    manifest_key: str
    manifest: bytes
    token: bytes | None
    admit: Callable[[str, bytes | None], bool]
    weights: str | None = None  # the swarm's initial weights file, checked against its hash
    needs_weights: bool = False  # the swarm has one and we do not: we must sync to start


def say(text: str) -> None:
    print(f"byteswarm node: {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    node, kcfg, mcfg, dcfg, acfg = load_configs(args)
    return launch(node, Path(args.out), lambda dht: (node, mcfg, dcfg, acfg, None),
                  fresh=args.fresh, quiet=args.quiet, kcfg=kcfg)


Configure = Callable[[Any], tuple[NodeConfig, ModelConfig, DataConfig, Any, "Public | None"]]


def launch(node: NodeConfig, out: Path, configure: Configure, *, fresh: bool,
           quiet: bool, kcfg: TaskConfig | None = None) -> int:
    """Start the DHT and p2pd, train, tear both down. ``configure(dht)`` returns the run's
    settings; a public swarm reads them from its manifest through the DHT just started
    (``node`` until then only says how to start it)."""
    out.mkdir(parents=True, exist_ok=True)
    key_path, peer_id = ensure_identity(node.identity or out / "identity.key")
    if node.threads:
        torch.set_num_threads(node.threads)

    # Signals that arrive while we start are remembered, not fatal: the DHT process and
    # p2pd must still be torn down.
    pending: list[int] = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, _f: pending.append(signum))
    # Fork the DHT process before torch starts threads of its own.
    dht = start_dht(node, str(key_path))
    start_reaper(dht)  # p2pd and the DHT process die with us, even after a kill -9
    try:
        if pending:
            return 128 + pending[0]
        node, mcfg, dcfg, acfg, public = configure(dht)
        kcfg = kcfg or TaskConfig()
        configs = {"swarm": node.swarm, "algo": node.algo, "seed": node.seed,
                   "task": kcfg.task, "model": C.to_dict(mcfg.resolved()),
                   "data": C.to_dict(dcfg),
                   node.algo: C.to_dict(acfg)}
        ckpt_path = out / "checkpoint.pt"
        ckpt = None
        if ckpt_path.exists() and not fresh:
            ckpt = load_checkpoint(ckpt_path)
            if ckpt.get("configs") != configs or ckpt.get("peer_id") != peer_id:
                raise C.ConfigError(f"{out} holds a run with another configuration or "
                                    "identity; use another --out, or --fresh to start over")
        for maddr in dht.get_visible_maddrs():
            say(f"listening on {maddr}")
        say(f"peer id {peer_id}")
        identity = load_identity(key_path)  # signs our DHT heartbeats, and frames if --sign
        return asyncio.run(serve(node, kcfg, mcfg, dcfg, acfg, dht, peer_id, out, configs,
                                 ckpt, pending, quiet=quiet, public=public, identity=identity,
                                 key=identity if node.sign else None))
    finally:
        stop_dht(dht)


async def serve(node: NodeConfig, kcfg: TaskConfig, mcfg: ModelConfig, dcfg: DataConfig,
                acfg: Any, dht: Any, peer_id: str, out: Path, configs: dict, ckpt: dict | None,
                pending: list[int], *, quiet: bool, public: Public | None = None,
                key: Ed25519PrivateKey | None = None, identity: Ed25519PrivateKey) -> int:
    loop = asyncio.get_running_loop()
    w = await loop.run_in_executor(None, make_task, kcfg, mcfg, dcfg, node.seed)
    if public is not None and public.weights is not None:
        init = await loop.run_in_executor(None, read_weights, public.weights, w.build())
        w = WithWeights(w, init)
        say(f"initial weights from {public.weights} (sha256 checked)")
    shard = node.shard if node.shard >= 0 else A.shard_index(peer_id, node.num_shards)
    algo = A.make_algorithm(node.algo, acfg, peer_id, shard, node.num_shards, w,
                            device=kcfg.device, dtype=kcfg.dtype)
    if ckpt is not None:
        algo.load_state_dict(ckpt["state"])
    await loop.run_in_executor(None, algo.warm_up)
    t0 = time.monotonic()
    why, driver = await drive(node, algo, dht, peer_id, out, configs, ckpt, pending,
                              quiet=quiet, public=public, key=key, identity=identity)
    summary = {**driver.summary(), "stopped": why, "algo": node.algo,
               "wall_seconds_this_run": round(time.monotonic() - t0, 3),
               "shard": shard, "config": configs}
    save_json(out / "summary.json", summary)
    if why == "signal":
        say(f"stopped by signal at step {driver.poll.progress}; checkpoint in {out}")
        return 128 + signal.SIGTERM
    if why == "no_peers":
        say(f"too few peers after {node.start_timeout:.0f} s; giving up")
        return 1
    if why == "no_weights":
        say("this swarm starts from a weights file, which we do not have, and no peer is "
            "ahead of us to copy the state from: pass --weights PATH")
        return 2
    val = summary["final_val_loss"]
    say(f"done: step {driver.poll.progress}, validation loss "
        f"{'n/a' if val is None else f'{val:.4f}'}, sent {summary['bytes_sent'] / 1e3:.1f} kB"
        f" -> {out}")
    return 0


async def drive(node: NodeConfig, algo: Any, dht: Any, peer_id: str, out: Path, configs: dict,
                ckpt: dict | None, pending: list[int], *, quiet: bool,
                public: Public | None = None, key: Ed25519PrivateKey | None = None,
                identity: Ed25519PrivateKey, pace: Callable[[], bool] | None = None,
                started: Callable[[Driver], None] | None = None,
                signals: bool = True) -> tuple[str, Driver]:
    """Run ``algo`` in the swarm until the plan's end or a stop: the driver and transport
    over our DHT, metrics and checkpoints in ``out``. ``pace``, ``started`` and ``signals``
    are for node/api.py, whose steps come from the user's training loop (``Plan``)."""
    loop = asyncio.get_running_loop()
    numel = int(sum(p.numel() for p in algo.model.parameters() if p.requires_grad))
    plan = Plan(swarm=node.swarm, steps=node.steps, min_peers=node.min_peers,
                start_timeout=node.start_timeout, eval_every=node.eval_every,
                checkpoint_every=node.checkpoint_every, peer_ttl=node.peer_ttl,
                sync=node.sync, linger=node.linger,
                announce_wait=2 * node.heartbeat_period,
                withhold_record=node.withhold_record, joining=bool(node.initial_peers),
                needs_weights=public is not None and public.needs_weights and ckpt is None)
    start = algo.position()
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if ckpt is not None else None)

    async def checkpoint(payload: dict) -> None:
        blob = {"version": CHECKPOINT_VERSION, "configs": configs, "peer_id": peer_id,
                **payload}
        await loop.run_in_executor(None, save_checkpoint, out / "checkpoint.pt", blob)

    driver = Driver(algo, plan, numel=numel, log_row=log.write, checkpoint=checkpoint,
                    say=(lambda s: None) if quiet else say,
                    seconds_before=float(ckpt["seconds"]) if ckpt else 0.0,
                    admit=public.admit if public is not None else None, pace=pace)
    tr = Transport(dht, node.swarm, peer_id, client_mode=node.client_mode,
                   frame_limit=A.frame_limit(numel), heartbeat_period=node.heartbeat_period,
                   peer_ttl=node.peer_ttl, on_frame=driver.on_frame,
                   on_members=driver.on_members, progress=lambda: driver.poll.progress,
                   marks=driver.recent_marks, identity=identity,
                   may_ask=driver.may_ask)
    if public is not None:
        tr.publish[public.manifest_key] = public.manifest  # so it outlives its creator
        if public.token is not None:
            tr.beat_extra["token"] = public.token
    tr.add_service("state", driver.donor.serve_state, P.REQUEST_LIMIT)
    tr.add_service("snap", driver.donor.serve_snap, P.REQUEST_LIMIT)
    if ckpt is not None:
        tr.sent.update(ckpt.get("sent", {}))
        tr.received.update(ckpt.get("received", {}))
    if key is not None:
        driver.frames.sealer = Sealer(key, node.swarm, driver.ctx,
                                      may_author=driver.may_author)
    driver.transport = tr
    for s in (signal.SIGINT, signal.SIGTERM) if signals else ():
        loop.add_signal_handler(s, driver.stop)
    for _ in pending:
        driver.stop()
    try:
        await tr.start()
        if ckpt is not None:
            say(f"resumed from {out / 'checkpoint.pt'} at step {start}")
        if started is not None:
            started(driver)
        why = await driver.run()
        await tr.flush(timeout=5.0)
    finally:
        await tr.close()
        log.close()
        driver.pool.shutdown(wait=True)
    return why, driver


if __name__ == "__main__":  # python -m byteswarm.node.node_cli …, without the dispatcher
    from .cli import main
    sys.exit(main(["node", *sys.argv[1:]]))
