"""The hivemind record validator every node runs: protocols/records.py's rules, on hivemind's
terms.

hivemind calls ``validate(record)`` in the DHT's own process (a fork of the node) when
another peer asks us to store a record, when we store one ourselves, and on every record
another peer returns to our ``get`` — so one rule guards what we keep and what we
believe. What it hands over is not what the application stored (hivemind/dht/node.py
and protocol.py):

- ``record.key`` is the 20-byte ``DHTID`` of the key (sha1 of the msgpack of the key
  string), not the string. A hash cannot be read back, so the validator computes the
  DHTIDs of its own swarm's two keys once and recognises only those; every other key
  passes untouched (other swarms' nodes guard theirs, and our readers check again).
- ``record.subkey`` is msgpack of the subkey (a peer id string for our entries), or
  ``msgpack(None)`` = ``b"\\xc0"`` for a plain value. A whole dictionary sent in one store
  is split by hivemind into one record per subkey before we see it.
- ``record.value`` is msgpack of the stored value: our entries and manifests are bytes, so
  one bin header wraps what records.py reads.
- ``record.expiration_time`` is the DHT expiration, a float anyone may choose.

The rules: at ``<swarm>.peers`` only entries signed by the key their subkey names (no
plain value, which would hide the dictionary, and no entry under another peer's id); at
``<swarm id>.manifest`` (when the swarm is a public one, named by its id) only the
manifest that id names, as one plain value. A refused store answers ``False`` to the peer
that asked; a refused answer to our ``get`` is dropped as if that peer had none. Note
that hivemind drops a peer's whole dictionary when one of its entries fails, so the peers
that hold our key should run this validator too: every byteswarm node does.

Refusals are counted by key and reason in ``refused`` and the last reason's detail kept
in ``last``; both live in the DHT process, and ``refusals`` fetches them from there with
``dht.run_coroutine`` (``byteswarm join`` names the reason when no manifest copy passes).
The object holds strings and bytes only, so it pickles.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
from byteswarm.optim.config import ConfigError
from byteswarm.optim.sansio import Rejected
from byteswarm.protocols import manifest, records
from byteswarm.protocols.swarmid import parse_swarm_id
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.timed_storage import get_dht_time

PLAIN = msgpack.packb(None)  # hivemind's subkey of a plain (non-dictionary) value
_LIVE: weakref.WeakSet[SwarmRecords] = weakref.WeakSet()  # for ``refusals``


def dht_id(key: str) -> bytes:
    """What hivemind puts in ``record.key`` for the DHT key ``key``."""
    return DHTID.generate(source=key).to_bytes()


def _unwrap(data: bytes, limit: int, what: str) -> Any:
    """One msgpack value (hivemind's serialisation of what was stored), bounded."""
    if not isinstance(data, bytes) or len(data) > limit + 8:
        raise Rejected("oversized", f"{what} over {limit} bytes")
    try:
        return msgpack.unpackb(data, raw=False, max_str_len=records.MAX_STR,
                               max_bin_len=limit, max_array_len=0, max_map_len=0,
                               max_ext_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError, UnicodeDecodeError) as e:
        raise Rejected("malformed", f"{what}: {type(e).__name__}") from None


def _is_swarm_id(name: str) -> bool:
    try:
        return parse_swarm_id(name) == name
    except ConfigError:
        return False


class SwarmRecords(RecordValidatorBase):
    """Validates the records under one swarm's keys (see the module docstring)."""

    def __init__(self, swarm: str, now: Callable[[], float] = get_dht_time):
        self.swarm, self.now = swarm, now
        self.peers_key = records.peers_key(swarm)
        self._peers_id = dht_id(self.peers_key)
        # A plain node's swarm is a name, not an id: nobody reads a manifest of it.
        self.swarm_id = swarm if _is_swarm_id(swarm) else None
        self.manifest_key = records.manifest_key(swarm) if self.swarm_id else None
        self._manifest_id = dht_id(self.manifest_key) if self.manifest_key else None
        self.refused: Counter[str] = Counter()  # "peers:<reason>" / "manifest:<reason>"
        self.last: dict[str, str] = {}  # same keys: the latest refusal's message
        _LIVE.add(self)

    def __setstate__(self, state: dict) -> None:  # unpickled in another process
        self.__dict__.update(state)
        _LIVE.add(self)

    def validate(self, record: DHTRecord) -> bool:
        if record.key == self._peers_id:
            where, check = "peers", self._check_entry
        elif self._manifest_id is not None and record.key == self._manifest_id:
            where, check = "manifest", self._check_manifest
        else:
            return True
        try:
            check(record)
        except Rejected as e:
            self.refused[f"{where}:{e.reason}"] += 1
            self.last[f"{where}:{e.reason}"] = str(e)[:300]
            return False
        return True

    def _check_entry(self, record: DHTRecord) -> None:
        if record.subkey == PLAIN:
            raise Rejected("plain_value", "the membership key holds signed entries only")
        subkey = _unwrap(record.subkey, records.MAX_STR, "subkey")
        data = _unwrap(record.value, records.MAX_ENTRY, "value")
        records.open_entry(data, dht_key=self.peers_key, subkey=subkey,
                           expiration=record.expiration_time, now=self.now())

    def _check_manifest(self, record: DHTRecord) -> None:
        if record.subkey != PLAIN:
            raise Rejected("not_plain", "the manifest key holds one plain value")
        blob = _unwrap(record.value, manifest.MAX_SIGNED, "value")
        records.check_manifest(blob, swarm_id=self.swarm_id,
                               expiration=record.expiration_time, now=self.now())


async def _refusals(_dht: Any, _node: Any, swarm: str) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    for v in list(_LIVE):
        if v.swarm == swarm:
            for k, n in v.refused.items():
                out[k] = (out.get(k, (0, ""))[0] + n, v.last.get(k, ""))
    return out


def refusals(dht: Any, swarm: str) -> dict[str, tuple[int, str]]:
    """``{"<peers|manifest>:<reason>": (count, last message)}`` of the validators for
    ``swarm`` in ``dht``'s process (the DHT process: that is where they run)."""
    return dht.run_coroutine(functools.partial(_refusals, swarm=swarm))
