"""Public swarms: ``byteswarm swarm create|token`` and ``byteswarm join``.

A public swarm is named by the id of its manifest (protocols/manifest.py): what it trains,
with which algorithm and numbers, who created it and who may contribute.

``byteswarm swarm create MANIFEST --identity KEY --out DIR`` signs the manifest with the
creator's key (it must be the manifest's ``creator``), prints the swarm id and the
multiaddrs others bootstrap from, and runs the first node. Every node of the swarm keeps
the signed manifest stored in the DHT under ``<id>.manifest``, so it outlives its creator.

``byteswarm join ID --bootstrap MADDR… --out DIR`` starts its DHT peer, fetches that
manifest through it, checks that it hashes to the id typed and that its creator
signed it, checks that our key is admitted (allowlist swarms: on the list, or ``--token``
from the creator), and only then runs a node with the manifest's settings; the node then
catches up with the swarm (protocols/catchup.py). A joiner that cannot verify refuses to
start and says why. Nodes of an allowlist swarm ignore peers that are not admitted.

``byteswarm swarm token MANIFEST --identity KEY --member HEX --out FILE`` writes an
admission token for a key, signed by the creator.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from byteswarm.optim import config as C
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.task import TaskConfig
from byteswarm.protocols import admission, manifest, records
from byteswarm.protocols.swarmid import parse_swarm_id
from hivemind import DHT

from . import dhtrecords
from .identity import load_identity, public_key_bytes, public_key_of
from .node_cli import Public, launch, say
from .settings import NodeConfig

# Fixed by the manifest or by the public-swarm rules, not by flags.
FIXED = ("swarm", "algo", "seed", "shard", "num_shards", "initial_peers", "withhold_record",
         "sign")
FETCH_TIMEOUT = 60.0
REFUSED_READS = 5  # reads that found only bad manifest copies before a join gives up
MAX_COPIES = 64  # values of one read that we try


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("swarm", help="create a public swarm, or sign an admission token",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inner = p.add_subparsers(dest="swarm_command", required=True, metavar="COMMAND")
    c = inner.add_parser("create", help="sign a manifest and run the swarm's first node")
    c.add_argument("manifest", metavar="MANIFEST", help="the swarm's manifest (TOML)")
    _node_arguments(c)
    c.set_defaults(func=run_create)
    t = inner.add_parser("token", help="admit a key to an allowlist swarm")
    t.add_argument("manifest", metavar="MANIFEST")
    t.add_argument("--identity", required=True, metavar="KEY", help="the creator's key")
    t.add_argument("--member", required=True, metavar="HEX", help="public key to admit")
    t.add_argument("--expires", type=float, default=0.0,
                   help="unix time after which the token is void (0: never)")
    t.add_argument("--out", required=True, metavar="FILE")
    t.set_defaults(func=run_token)


def register_join(sub: argparse._SubParsersAction) -> None:
    j = sub.add_parser("join", help="join a public swarm by its id",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    j.add_argument("swarm_id", metavar="ID", help="the swarm id (bs1…)")
    j.add_argument("--bootstrap", required=True, nargs="+", metavar="MADDR",
                   help="multiaddrs of any peers of the swarm")
    j.add_argument("--token", metavar="FILE", help="admission token from the creator")
    _node_arguments(j)
    j.set_defaults(func=run_join)


def _node_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for metrics, summary, checkpoint and identity")
    p.add_argument("--data-file", metavar="PATH",
                   help="local copy of the swarm's data file (if it does not train on the "
                        "embedded corpus); its sha256 must match the manifest")
    p.add_argument("--weights", metavar="PATH",
                   help="local copy of the swarm's initial weights file, if its manifest "
                        "names one (sha256 checked); a joiner of a running swarm may go "
                        "without: it copies the state from peers")
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    for name in ("host_maddrs", "announce_maddrs"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, nargs="+", metavar="MADDR")
    C.add_arguments(p, NodeConfig, title="node options",
                    skip=FIXED + ("host_maddrs", "announce_maddrs"))
    C.add_arguments(p, TaskConfig, title="task options (a user task must be the manifest's "
                    "[init] task: byteswarm runs no code a manifest names unless you name "
                    "it too)")


def _node_config(args: argparse.Namespace, algo: str, seed: int, sid: str,
                 initial_peers: list[str]) -> NodeConfig:
    for name in ("host_maddrs", "announce_maddrs"):
        if isinstance(getattr(args, name, None), list):
            setattr(args, name, " ".join(getattr(args, name)))
    node = C.resolve(NodeConfig, args, {}, where="node")
    node = dataclasses.replace(node, swarm=sid, algo=algo, seed=seed, sign=True,
                               initial_peers=" ".join(initial_peers))
    node.check()
    return node


def _public(m: manifest.Manifest, sid: str, blob: bytes, token: bytes | None) -> Public:
    def admit(peer: str, tok: bytes | None) -> bool:
        try:
            admission.check_admission(m, public_key_of(peer), now=time.time(), token=tok,
                                      swarm_id=sid)
        except Rejected:
            return False
        return True

    return Public(f"{sid}.manifest", blob, token,
                  (lambda p, t: True) if m.admission == "open" else admit)


def _run(args: argparse.Namespace, sid: str, initial_peers: list[str],
         configure: Callable[[DHT], tuple[manifest.Manifest, bytes, bytes | None]]) -> int:
    """Run a node of swarm ``sid``; ``configure(dht)`` yields its manifest, the signed
    bytes to keep published and our admission token."""
    first = _node_config(args, "spsa", 0, sid, initial_peers)
    kcfg = C.resolve(TaskConfig, args, {}, where="task")

    def settings(dht: DHT) -> tuple:
        m, blob, token = configure(dht)
        if (m.task or "") != kcfg.task:
            theirs = f"task {printable(m.task)}" if m.task else "the built-in task"
            fix = (f"run with --task {printable(m.task)} (its code must be on this machine)"
                   if m.task else "run without --task")
            raise C.ConfigError(f"manifest: this swarm trains {theirs}, not "
                                f"{kcfg.task or 'the built-in task'}: {fix}")
        if m.weights is not None and args.weights:
            m.check_weights(args.weights)
        elif m.weights is not None and not initial_peers:
            raise C.ConfigError(f"manifest: this swarm starts from the weights file "
                                f"{m.weights}; pass it with --weights PATH")
        node = dataclasses.replace(first, algo=m.algorithm, seed=m.seed)
        node.check()
        public = _public(m, sid, blob, token)
        if m.weights is not None:
            public = dataclasses.replace(public, weights=args.weights,
                                         needs_weights=not args.weights)
        return node, m.model, m.data_config(args.data_file), m.algo_config(), public

    return launch(first, Path(args.out), settings, fresh=args.fresh, quiet=args.quiet,
                  kcfg=kcfg)


def _identity_path(args: argparse.Namespace) -> Path:
    return Path(args.identity or Path(args.out) / "identity.key").expanduser()


def run_create(args: argparse.Namespace) -> int:
    m = manifest.load(args.manifest)
    path = _identity_path(args)
    if not path.exists():
        raise C.ConfigError(f"identity: {path} does not exist; make the creator's key with "
                            "byteswarm keygen and put its public key in the manifest")
    key = load_identity(path)
    mine = public_key_bytes(key)
    if mine != m.creator:
        raise C.ConfigError(f"manifest: creator is {m.creator.hex()}, but {path} is "
                            f"{mine.hex()}; sign with the creator's key")
    m = m.pinned()
    if m.data.data.startswith("stdlib-"):
        say(f"corpus pinned to this machine's standard library: {m.data.data[:40]}…")
    signed = manifest.sign(m, key)
    sid = signed.swarm_id
    say(f"swarm id {sid}")
    return _run(args, sid, [], lambda dht: (m, signed.to_bytes(), None))


def printable(text: str, limit: int = 300) -> str:
    """``text`` (which may hold bytes a stranger chose) safe to print: control and other
    non-printing characters escaped, as repr does, and cut to ``limit`` characters."""
    return repr(str(text)[:limit])[1:-1]


def _candidates(found: Any) -> list[Any]:
    """Every value found under a key: the plain value, or each entry of a dictionary
    (nobody honest stores one at a manifest key, but a reader takes what comes)."""
    value = getattr(found, "value", None)
    if isinstance(value, dict):
        return [getattr(item, "value", None) for item in list(value.values())[:MAX_COPIES]]
    return [value] if value is not None else []


def _manifest_refusals(dht: DHT, sid: str) -> tuple[int, dict[str, str]]:
    """How many manifest copies our DHT process has refused so far, and the latest
    message for each reason."""
    refused = {k.split(":", 1)[1]: v for k, v in dhtrecords.refusals(dht, sid).items()
               if k.startswith("manifest:")}
    return sum(n for n, _ in refused.values()), {k: m for k, (_, m) in refused.items()}


def fetch_manifest(dht: DHT, sid: str, timeout: float) -> bytes:
    """The signed manifest of ``sid``, as any peer holds it under ``<sid>.manifest``.

    Anyone can store anything at that key. Our DHT process already refuses copies that
    are not the manifest ``sid`` names (node/dhtrecords.py), on store and on read; we
    check every copy that comes through once more and take the first that passes. A read
    that finds no copy is retried until ``timeout`` (the peers may not be reachable yet); a
    read that finds only bad copies, ``REFUSED_READS`` times, a second apart (a good copy
    may sit on a peer not yet reached), then we give up and say why.
    """
    deadline = time.monotonic() + timeout
    bad_reads, seen = 0, _manifest_refusals(dht, sid)[0]
    while True:
        found = dht.get(records.manifest_key(sid), latest=True)
        copies = _candidates(found)
        why: dict[str, str] = {}
        for blob in copies:
            try:
                manifest.verify(blob, sid)
                return blob
            except Rejected as e:
                why[e.reason] = str(e)
        total, messages = _manifest_refusals(dht, sid)
        if copies or total > seen:  # this read met copies, and every one was bad
            bad_reads += 1
        seen = total
        if bad_reads >= REFUSED_READS:
            reasons = "; ".join(printable(m, 200) for m in {**messages, **why}.values())
            raise C.ConfigError(f"join: refusing to join {sid}: every copy of its manifest "
                                f"that peers hold was refused ({reasons})")
        if time.monotonic() > deadline:
            raise C.ConfigError(f"join: no peer reachable through the bootstrap addresses "
                                f"has the manifest of {sid}")
        time.sleep(1.0)


def run_join(args: argparse.Namespace) -> int:
    sid = parse_swarm_id(args.swarm_id)
    token = Path(args.token).read_bytes() if args.token else None

    def configure(dht: DHT) -> tuple[manifest.Manifest, bytes, bytes | None]:
        blob = fetch_manifest(dht, sid, FETCH_TIMEOUT)
        try:
            m = manifest.verify(blob, sid)
            admission.check_admission(m, public_key_bytes(load_identity(_identity_path(args))),
                                      now=time.time(), token=token, swarm_id=sid)
        except Rejected as e:
            raise C.ConfigError(f"join: refusing to join {sid}: {printable(str(e))}") from None
        say(f"manifest of {sid} verified: {m.name!r}, {m.algorithm}, created by "
            f"{m.creator.hex()[:16]}…")
        return m, blob, token

    return _run(args, sid, args.bootstrap, configure)


def run_token(args: argparse.Namespace) -> int:
    m = manifest.load(args.manifest)
    key = load_identity(Path(args.identity).expanduser())
    if public_key_bytes(key) != m.creator:
        raise C.ConfigError("token: only the manifest's creator can admit keys")
    try:
        member = bytes.fromhex(args.member)
    except ValueError:
        raise C.ConfigError("token: --member must be a public key in hex") from None
    if len(member) != 32:
        raise C.ConfigError("token: --member must be 32 bytes (64 hex digits)")
    tok = admission.make_token(key, swarm_id=m.swarm_id, member=member, expires=args.expires)
    Path(args.out).write_bytes(tok)
    print(f"wrote {args.out}: admits {args.member[:16]}… to {m.swarm_id}")
    return 0
