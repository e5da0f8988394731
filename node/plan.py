"""What the node's driver is told to do (``Plan``), and what it learns after each call into
the algorithm (``Poll``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from byteswarm.optim.sansio import Send


@dataclass
class Poll:
    """What the loop needs to know after any call into the algorithm."""

    can_step: bool = True
    deadline: float | None = None
    progress: int = 0
    mark: tuple[int, str] | None = None
    outbox: list[Send] = field(default_factory=list)
    served: tuple[int, Any] | None = None  # a new state to serve joiners: (tag, state)


@dataclass(frozen=True, kw_only=True)
class Plan:
    swarm: str
    steps: int  # stop when the swarm position reaches this (0: never)
    min_peers: int
    start_timeout: float
    eval_every: int
    checkpoint_every: int
    peer_ttl: float
    sync: bool
    linger: float
    announce_wait: float  # before a state download: let the others see our heartbeat
    withhold_record: int = -1  # testing: our record of this step goes to one peer only
    needs_weights: bool = False  # we lack the swarm's initial weights: only a sync will do
    joining: bool = False  # we were given initial peers: wait to see one of them
