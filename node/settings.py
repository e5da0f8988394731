"""The node's own settings: the [node] table of a config file, and its flags."""

from __future__ import annotations

import re
from dataclasses import dataclass

from byteswarm.optim.config import ConfigError, opt, validate

SWARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Fields holding several multiaddrs: flags take them space-separated (nargs), TOML as lists.
LISTS = ("initial_peers", "host_maddrs", "announce_maddrs")


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    swarm: str = opt("byteswarm", "swarm name: namespace of every DHT key and stream "
                     "protocol, and SPSA's seed prefix (letters, digits, . _ -)")
    algo: str = opt("spsa", "training algorithm", choices=("spsa", "noloco", "diloco"))
    initial_peers: str = opt("", "multiaddrs of peers already in the swarm (none: start "
                             "a new swarm)")
    host_maddrs: str = opt("/ip4/127.0.0.1/tcp/0", "where to listen; the default is "
                           "loopback only, so nothing is exposed unless asked: use "
                           "/ip4/0.0.0.0/tcp/PORT to accept peers from other machines")
    announce_maddrs: str = opt("", "addresses to tell others (behind port forwarding)")
    identity: str = opt("", "Ed25519 key file, created on first use (default: "
                        "OUT/identity.key, so a restart keeps its peer id)")
    client_mode: bool = opt(False, "do not accept incoming connections (behind NAT): "
                            "dial the others and hear back on those streams")
    steps: int = opt(0, "train until the swarm position reaches this step (0: until "
                     "stopped by SIGINT or SIGTERM)", lo=0)
    min_peers: int = opt(1, "before the first step, wait until this many peers (self "
                         "included) are in a new swarm; a node given --initial-peers also "
                         "waits to see at least one other", lo=1, hi=100_000)
    start_timeout: float = opt(300.0, "give up if min_peers are not there after this many "
                               "seconds", lo=0.0, lo_open=True)
    eval_every: int = opt(10, "evaluate validation loss every this many steps", lo=1)
    checkpoint_every: int = opt(50, "checkpoint every this many steps", lo=1)
    seed: int = opt(0, "run seed: initial weights, data deal and validation batches; "
                    "the same on every peer", lo=0, hi=2**62)
    shard: int = opt(-1, "which data shard this peer reads (-1: from a hash of its peer id)",
                     lo=-1)
    num_shards: int = opt(16, "shards the corpus is dealt into", lo=1, hi=65536)
    heartbeat_period: float = opt(2.0, "seconds between DHT heartbeats", lo=0.05)
    peer_ttl: float = opt(10.0, "a peer without a heartbeat or message for this long is "
                          "gone", lo=0.1)
    sign: bool = opt(False, "seal every message with our identity key and accept only "
                     "messages sealed by their sender (always on in public swarms)")
    sync: bool = opt(True, "on joining a swarm that is ahead, download a peer's state")
    linger: float = opt(2.0, "seconds to keep serving peers after the last step", lo=0.0)
    threads: int = opt(0, "torch CPU threads (0: torch's default)", lo=0, hi=1024)
    withhold_record: int = opt(-1, "testing only: send our SPSA record of this step to one "
                               "peer, not all, to provoke a split and its repair (-1: off)",
                               lo=-1)

    def check(self) -> None:
        validate(self)
        if not SWARM_NAME.match(self.swarm):
            raise ConfigError(f"node: swarm name {self.swarm!r} must be 1-64 letters, digits, "
                              ". _ or -, starting with a letter or digit")
        if self.shard >= self.num_shards:
            raise ConfigError(f"node: shard {self.shard} is not below num_shards "
                              f"{self.num_shards}")
        if self.peer_ttl <= self.heartbeat_period:
            raise ConfigError("node: peer_ttl must be longer than heartbeat_period")

    def maddrs(self, name: str) -> list[str]:
        return getattr(self, name).split()


def join_lists(section: dict) -> dict:
    """A TOML [node] table may give multiaddr fields as lists; the config holds strings."""
    out = dict(section)
    for key in LISTS:
        if isinstance(out.get(key), list):
            if not all(isinstance(v, str) for v in out[key]):
                raise ConfigError(f"node: {key} must be a list of strings")
            out[key] = " ".join(out[key])
    return out
