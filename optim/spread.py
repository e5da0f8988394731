"""How far apart replicas are: NoLoCo's replicas stay slightly different (an ensemble),
DiLoCo's should be identical. Drivers report these numbers beside the losses."""

from __future__ import annotations

import itertools

import torch


def _flat(x: torch.nn.Module | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.nn.Module):
        return torch.cat([p.detach().reshape(-1).float() for p in x.parameters()
                          if p.requires_grad])
    return x.detach().reshape(-1).float()


def replica_spread(replicas: list[torch.nn.Module] | list[torch.Tensor]) -> dict[str, float]:
    """Spread of R replicas (models, or flat (N,) parameter vectors of one length).

    Returns:
        mean_std: the mean over the N parameters of the standard deviation across the
            replicas (population std, so two replicas at ±d give d);
        max_rel_l2: the largest ‖x_a − x_b‖ / ((‖x_a‖ + ‖x_b‖)/2) over pairs a < b;
        replicas: R.
    A single replica has spread 0.
    """
    flats = [_flat(r) for r in replicas]
    if not flats:
        raise ValueError("replica_spread needs at least one replica")
    if len({f.numel() for f in flats}) != 1:
        raise ValueError("replicas have different parameter counts")
    stack = torch.stack(flats)  # (R, N)
    mean_std = float(stack.std(dim=0, correction=0).mean()) if stack.shape[1] else 0.0
    worst = 0.0
    for a, b in itertools.combinations(flats, 2):
        scale = 0.5 * (float(a.norm()) + float(b.norm()))
        if scale > 0:
            worst = max(worst, float((a - b).norm()) / scale)
    return {"mean_std": mean_std, "max_rel_l2": worst, "replicas": len(flats)}
