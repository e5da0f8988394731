"""Scenario files (TOML) -> peer specs and a network.

A scenario names groups of peers, each a share of the swarm with its own links, region and
compute speed, plus optional region-to-region latencies and churn. Every value carries its
unit in its name (``_mbps``, ``_ms``, ``_s``) or in a comment in the shipped files.
Shipped scenarios live in ``sim/scenarios/``; ``load_scenario`` takes a name or a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from byteswarm.optim.config import ConfigError, from_mapping, load_toml, opt

from .engine import PeerSpec
from .joining import Hostile
from .network import INF, Link, Network


@dataclass(frozen=True, kw_only=True)
class Group:
    share: float = opt(1.0, "fraction of the peers in this group", lo=0.0, hi=1.0,
                       lo_open=True)
    region: str = opt("", "region name, keys region_latency_ms")
    up_mbps: float = opt(100.0, "uplink, megabits per second", lo=0.0, lo_open=True)
    down_mbps: float = opt(100.0, "downlink, megabits per second", lo=0.0, lo_open=True)
    latency_ms: float = opt(0.0, "one-way access latency, milliseconds", lo=0.0)
    jitter_ms: float = opt(0.0, "extra uniform delay per message, milliseconds", lo=0.0)
    loss: float = opt(0.0, "probability that one message attempt is lost", lo=0.0, hi=0.5)
    compute_speed: float = opt(1.0, "relative compute speed", lo=0.0, lo_open=True)
    compute_jitter: float = opt(0.0, "per-step compute time spread (fraction)", lo=0.0, hi=0.9)
    straggler_prob: float = opt(0.0, "chance per step that a slow episode starts", lo=0.0,
                                hi=1.0)
    straggler_factor: float = opt(1.0, "slowdown during an episode", lo=1.0)
    straggler_steps: int = opt(0, "steps an episode lasts", lo=0)


@dataclass(frozen=True, kw_only=True)
class Churn:
    leave_fraction: float = opt(0.0, "fraction of the peers that leave", lo=0.0, hi=0.9)
    leave_at_step: float = opt(0.5, "they leave on reaching this fraction of the steps",
                               lo=0.0, hi=1.0)
    rejoin_after_s: float = opt(0.0, "virtual seconds until they return (0: never)", lo=0.0)
    hang_fraction: float = opt(0.0, "fraction of the peers that hang without leaving: they "
                               "stop computing and sending, yet stay listed", lo=0.0, hi=0.9)
    hang_at_step: float = opt(0.25, "they hang on reaching this fraction of the steps",
                              lo=0.0, hi=1.0)
    hang_listed_s: float = opt(60.0, "virtual seconds a hung peer stays listed (its "
                               "membership entry's lifetime)", lo=0.0)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    forward_seconds: float
    groups: tuple[Group, ...]
    region_latency_ms: dict[str, float]
    churn: Churn
    rto_s: float = 1.0
    hostile: Hostile = Hostile()

    def peer_specs(self, n: int, steps: int, forwards_per_step: float) -> list[PeerSpec]:
        """n peers dealt to groups by share (largest remainder, in group order)."""
        counts = [int(g.share * n) for g in self.groups]
        order = sorted(range(len(self.groups)),
                       key=lambda i: -(self.groups[i].share * n - counts[i]))
        for i in order[: n - sum(counts)]:
            counts[i] += 1
        leavers = round(self.churn.leave_fraction * n)
        hangers = round(self.churn.hang_fraction * n)
        specs = []
        for gi, g in enumerate(self.groups):
            for _ in range(counts[gi]):
                k = len(specs)
                pid = f"p{k:04d}"
                # Leavers are spread over the groups: the last of every n / leavers peers
                # (so p0000, the one evaluated first, stays).
                stride = max(1, n // leavers) if leavers else 0
                leaves = leavers > 0 and k % stride == stride - 1 and \
                    sum(1 for s in specs if s.leave_after_steps) < leavers
                specs.append(PeerSpec(
                    id=pid, region=g.region,
                    link=Link(up=g.up_mbps * 1e6 / 8, down=g.down_mbps * 1e6 / 8,
                              latency=g.latency_ms / 1e3, jitter=g.jitter_ms / 1e3,
                              loss=g.loss),
                    step_seconds=self.forward_seconds * forwards_per_step / g.compute_speed,
                    jitter=g.compute_jitter, straggler_prob=g.straggler_prob,
                    straggler_factor=g.straggler_factor, straggler_steps=g.straggler_steps,
                    leave_after_steps=max(1, int(self.churn.leave_at_step * steps))
                    if leaves else None,
                    rejoin_after=self.churn.rejoin_after_s))
        # Those that hang: the last peers that do not leave (p0000 is evaluated first).
        for spec in [s for s in specs[1:] if not s.leave_after_steps][::-1][:hangers]:
            spec.hang_after_steps = max(1, int(self.churn.hang_at_step * steps))
            spec.hang_listed = self.churn.hang_listed_s
        return specs

    def network(self, seed: int) -> Network:
        lat = {}
        for key, ms in self.region_latency_ms.items():
            a, _, b = key.partition("-")
            lat[(a, b)] = ms / 1e3
        return Network(region_latency=lat, rto=self.rto_s, seed=seed)


def shipped() -> list[str]:
    folder = resources.files("byteswarm.sim") / "scenarios"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_scenario(name_or_path: str) -> Scenario:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        data, name = load_toml(path), path.stem
    elif name_or_path in shipped():
        text = (resources.files("byteswarm.sim") / "scenarios" / f"{name_or_path}.toml")
        data, name = load_toml(Path(str(text))), name_or_path
    else:
        raise ConfigError(f"scenario {name_or_path!r}: no such file, and not one of "
                          f"{', '.join(shipped())}")
    return parse_scenario(name, data)


def parse_scenario(name: str, data: dict) -> Scenario:
    known = {"description", "forward_seconds", "group", "region_latency_ms", "churn", "rto_s",
             "hostile"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"scenario {name}: unknown key {unknown[0]!r}")
    groups = data.get("group")
    if not isinstance(groups, list) or not groups:
        raise ConfigError(f"scenario {name}: needs at least one [[group]]")
    parsed = tuple(from_mapping(Group, g, where=f"scenario {name} group {i + 1}")
                   for i, g in enumerate(groups))
    total = sum(g.share for g in parsed)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"scenario {name}: group shares add up to {total:g}, not 1")
    fwd = data.get("forward_seconds", 0.05)
    if not isinstance(fwd, (int, float)) or isinstance(fwd, bool) or not 0 < fwd < INF:
        raise ConfigError(f"scenario {name}: forward_seconds must be a positive number")
    lat = data.get("region_latency_ms", {})
    if not isinstance(lat, dict) or any(
            not isinstance(v, (int, float)) or v < 0 or "-" not in k for k, v in lat.items()):
        raise ConfigError(f"scenario {name}: region_latency_ms maps 'a-b' to milliseconds")
    return Scenario(name=name, description=str(data.get("description", "")),
                    forward_seconds=float(fwd), groups=parsed,
                    region_latency_ms={k: float(v) for k, v in lat.items()},
                    churn=from_mapping(Churn, data.get("churn", {}), where=f"scenario {name}"),
                    rto_s=float(data.get("rto_s", 1.0)),
                    hostile=from_mapping(Hostile, data.get("hostile", {}),
                                         where=f"scenario {name} [hostile]"))
