"""Your own model and training loop, trained with a swarm through ``byteswarm.Optimizer``.

A small MLP learns to imitate a fixed random "teacher" network on inputs made in code (no
download). Start one peer, then others with the address it prints:

    python examples/optimizer_loop.py --algo noloco --peers 2
    python examples/optimizer_loop.py --algo noloco --peers 2 --initial-peers /ip4/127.0.0.1/tcp/…

Each prints a JSON line per evaluation ({"step", "loss", "val_loss"}) and a last one with
the result. ``--algo spsa`` trains with seeded SPSA: no backward pass, only a closure that
returns the loss; every peer then holds the same weights (``fingerprint``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

IN, HIDDEN, OUT = 16, 64, 4


def make_model(seed: int = 0) -> nn.Module:
    """Every peer must start from the same weights: seed the init."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs, and the classes a fixed random teacher gives them."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, IN, generator=g)
    return x, (x @ teacher).argmax(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", default="noloco", choices=("noloco", "diloco", "spsa"))
    ap.add_argument("--steps", type=int, default=60, help="local steps to take")
    ap.add_argument("--peers", type=int, default=1, help="wait for this many peers to start")
    ap.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR")
    ap.add_argument("--swarm", default="optimizer-example")
    ap.add_argument("--out", default=None, help="metrics, checkpoint and identity (default: "
                    "a temporary folder)")
    ap.add_argument("--data-seed", type=int, default=1, help="this peer's data (make each "
                    "peer's differ)")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    import byteswarm

    torch.set_num_threads(1)
    model = make_model()
    x_val, y_val = make_data(1024, seed=999)
    config = {"spsa": {"lr": 0.02, "eps": 1e-2, "step_timeout": 10.0},
              "noloco": {"inner_steps": 10, "lr": 3e-3, "warmup": 0},
              "diloco": {"inner_steps": 10, "lr": 3e-3, "warmup": 0}}[args.algo]
    node = {"min_peers": args.peers, "heartbeat_period": 0.5, "peer_ttl": 10.0,
            "linger": 1.0}
    opt = byteswarm.Optimizer(model.parameters(), algo=args.algo, swarm=args.swarm,
                              initial_peers=args.initial_peers, config=config, node=node,
                              out=args.out, quiet=False)
    with opt:
        def val_loss() -> float:
            with torch.no_grad():
                return F.cross_entropy(model(x_val), y_val).item()

        first = val_loss()
        for step in range(args.steps):
            x, y = make_data(args.batch, seed=args.data_seed * 1_000_003 + step)
            if args.algo == "spsa":
                loss = opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
            else:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                loss = loss.item()
            if (step + 1) % 10 == 0:
                print(json.dumps({"step": step + 1, "loss": round(loss, 5),
                                  "val_loss": round(val_loss(), 5)}), flush=True)
        result = {"done": args.steps, "first_val_loss": first, "val_loss": val_loss(),
                  "position": opt.position}
        if args.algo == "spsa":
            result["fingerprint"] = opt.algorithm.fingerprint()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
