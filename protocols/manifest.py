"""Swarm manifests: what a public swarm trains, who may join, and the id that pins it.

A manifest is written as TOML by the swarm's creator, signed once, and travels as bytes.
Its id is a hash of its canonical bytes, so a joiner who types ``byteswarm join bs1…``
can check that the manifest a stranger hands over is the one the id names: change any
field and the id no longer matches.

The TOML form (every table and most keys optional; the defaults are the dataclasses')::

    name = "tiny-noloco"              # human-readable; not the id
    algorithm = "noloco"              # a key of optim.workload.ALGOS
    codec = "int8"                    # tensor codec (spsa: must be "none")
    creator = "<64 hex>"              # Ed25519 public key of the signer
    admission = "allowlist"           # "open" or "allowlist"
    allowlist = ["<64 hex>", ...]     # who may contribute (plus creator, plus tokens)

    [model]                           # optim.model.ModelConfig
    preset = "tiny"
    [data]                            # optim.data.DataConfig, but no local path:
    corpus = "stdlib"                 # the embedded corpus (swarm create pins it to
                                      # "stdlib-<python>:sha256:<hex>"), or
                                      # "sha256:<64 hex>" of a file
    batch_size = 16
    [init]
    seed = 0                          # run seed: weights, data deal, validation batches
    weights = "sha256:<64 hex>"       # optional: start from this weights file instead
    task = "examples/hf_task.py:task" # optional: a user task (optim/task.py), not the
                                      # built-in one; a joiner must name it too (--task)
    [noloco]                          # the algorithm's config, named after it
    inner_steps = 50

Validation is optim/config.py's: an unknown key, a wrong type or a value out of range is
one ``ConfigError`` sentence naming the table and key. Keys that cannot be swarm-wide are
refused: a local ``data`` path (use ``corpus``), ``impl`` (a kernel choice of each
machine), ``codec`` inside the algorithm table (it is the top-level key), and SPSA's
``swarm`` (seeds derive from the swarm id; ``Manifest.algo_config`` fills it in).

Canonical bytes. ``to_dict`` writes every field, defaults included, model dimensions
resolved from the preset, keys as lowercase hex, the allowlist sorted; ``canonical_bytes``
is msgpack of that dict with every map's keys sorted (ints in their shortest form, floats
as float64, strings utf-8). Pinning the defaults means a peer whose byteswarm has other
defaults still runs the swarm's numbers. Decoding insists that re-encoding gives the same
bytes (``not_canonical``), so one manifest has exactly one encoding and one id. One
exception keeps old swarms joinable: a key missing from the bytes (a config field added
after the manifest was made) takes the reader's default, which must be the old behaviour;
the manifest keeps the bytes it came from, and they define its id.

Swarm id: ``bs1`` + bech32m (BIP-350) of the first 20 bytes of sha256(canonical bytes),
41 characters whose checksum catches any mistyping of up to four characters
(protocols/swarmid.py; ``parse_swarm_id`` there checks what a user typed).

Signature: Ed25519 by ``creator`` over ``SIGN_TAG ‖ canonical``. A signed manifest travels
as msgpack ``[FORMAT, canonical: bin, signature: bin 64]``, at most ``MAX_SIGNED`` bytes.
``verify(blob, expected_id)`` checks size and shape, then the id (``id_mismatch``: the
manifest was changed), then parses and validates the fields (``bad_manifest``,
``not_canonical``), then the signature (``bad_signature``) and returns the Manifest.
Every failure is ``Rejected(reason, detail)``, like protocols/wire.py.

Hostile bytes. Before msgpack builds anything, protocols/msgshape.py reads every header
(nesting at most ``MAX_DEPTH`` deep, where a real manifest nests two; no container
claiming more items than bytes remain; nothing truncated, nothing after the value): ten
kilobytes of nested headers once made the unpacker reserve ~8 MB, and a thousand nested
arrays overflowed Python's stack. The walks over decoded values are loops.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from byteswarm.optim.codecs import CODECS
from byteswarm.optim.config import ConfigError, from_mapping, load_toml, tomllib
from byteswarm.optim.data import STDLIB_PIN, DataConfig, check_stdlib_pin, stdlib_pin
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.workload import ALGOS
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import swarmid
from .msgshape import check_ints, check_shape
from .signing import SIG_BYTES, pack, public_key_bytes, sign_bytes, verify_bytes

FORMAT = 1
SIGN_TAG = b"byteswarm/manifest/v1\0"
MAX_ALLOWLIST = 1000  # keys; admit more with tokens (protocols/admission.py)
MAX_SIGNED = 1 << 17  # bytes of a signed manifest: 1000 hex keys are ~67 kB
# Containers inside containers: a manifest is a map of tables and an allowlist (2 deep);
# the slack is for a future config field holding a list.
MAX_DEPTH = 4
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HEX_KEY = re.compile(r"^[0-9a-f]{64}$")
TASK_SPEC = re.compile(r"^[A-Za-z0-9_./-]{1,160}:[A-Za-z_][A-Za-z0-9_.]{0,38}$")
ADMISSION = ("open", "allowlist")
DERIVED = {"swarm": "it is derived from the swarm id"}
LOCAL = {"impl": "it is each machine's kernel choice"}
TOP = ("format", "name", "algorithm", "codec", "creator", "admission", "allowlist",
       "model", "data", "init")


@dataclass(frozen=True)
class Manifest:
    name: str
    algorithm: str
    codec: str
    creator: bytes  # raw Ed25519 public key
    admission: str
    allowlist: tuple[bytes, ...]  # sorted, unique raw keys
    model: ModelConfig  # resolved: every dimension set
    data: DataConfig  # .data is "stdlib" or "sha256:<hex>": use data_config(path)
    seed: int
    weights: str | None  # "sha256:<hex>" of a weights file, or None: from the seed
    params: tuple[tuple[str, Any], ...]  # the algorithm table, every field, sorted
    task: str | None = None  # "module:attr" of a user task, or None: the built-in one
    # The bytes this manifest was decoded from (they, not a re-encoding, define its id).
    # init=False: dataclasses.replace() drops them, so an edited copy gets a new id.
    _canonical: bytes | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def swarm_id(self) -> str:
        return swarm_id(self)

    def algo_config(self, **local: Any) -> Any:
        """The algorithm's config dataclass: the manifest's numbers, the swarm id where the
        algorithm takes one (SPSA's seeds), and ``local`` choices (``impl``)."""
        bad = sorted(set(local) - set(LOCAL))
        if bad:
            raise ConfigError(f"manifest: {bad[0]!r} is fixed by the manifest, not local")
        cls = ALGOS[self.algorithm].config_cls
        names = {f.name for f in dataclasses.fields(cls)}
        data = dict(self.params, **local)
        if "codec" in names:
            data["codec"] = self.codec
        if "swarm" in names:
            data["swarm"] = self.swarm_id
        return from_mapping(cls, data, where=f"manifest [{self.algorithm}]")

    def data_config(self, path: str | Path | None = None) -> DataConfig:
        """The DataConfig to load: the embedded corpus, or ``path`` once its sha256 matches
        the manifest's (reads the file)."""
        if self.data.data == "stdlib":
            return self.data
        if STDLIB_PIN.match(self.data.data):
            check_stdlib_pin(self.data.data, self.data)  # loads the corpus once
            return dataclasses.replace(self.data, data="stdlib")
        if path is None:
            raise ConfigError(f"manifest: this swarm trains on a data file "
                              f"({self.data.data}); give its local path")
        check_file(path, self.data.data, what="data")
        return dataclasses.replace(self.data, data=str(path))

    def pinned(self) -> Manifest:
        """This manifest with a bare ``corpus = "stdlib"`` pinned to this machine's
        standard library (a new manifest, so a new id); others unchanged."""
        if self.data.data != "stdlib":
            return self
        return dataclasses.replace(
            self, data=dataclasses.replace(self.data, data=stdlib_pin(self.data)))

    def check_weights(self, path: str | Path) -> None:
        """ConfigError unless ``path`` is the swarm's initial weights file (reads it)."""
        if self.weights is None:
            raise ConfigError("manifest: this swarm starts from its seed, not a weights file")
        check_file(path, self.weights, what="weights")


# --- parsing and validation -------------------------------------------------------------


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is not a string")
    return value


def _str(d: Mapping, key: str, where: str, default: str | None = None) -> str:
    value = d.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: {key} must be set")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key}: expected a string, got {value!r}"[:200])
    return value


def _key(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not HEX_KEY.match(value.lower()):
        raise ConfigError(f"{what}: expected an Ed25519 public key as 64 hex digits "
                          f"(see byteswarm keygen), got {value!r}"[:200])
    return bytes.fromhex(value)


def _sha(value: Any, what: str) -> str:
    if (not isinstance(value, str) or not value.startswith("sha256:")
            or not HEX_KEY.match(value[7:].lower())):
        raise ConfigError(f"{what}: expected 'sha256:' and 64 hex digits, got {value!r}"[:200])
    return value.lower()


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """from_mapping, with the config's own cross-field checks also naming ``where``."""
    try:
        return from_mapping(cls, data, where=where)
    except ConfigError as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from None


def _algorithm_config(algo: str, table: dict[str, Any], codec: str, top: str) -> Any:
    where = f"{top} [{algo}]"
    for key in table:
        why = DERIVED.get(key) or LOCAL.get(key)
        if why:
            raise ConfigError(f"{where}: {key} cannot be set in a manifest: {why}")
        if key == "codec":
            raise ConfigError(f"{where}: set codec at the top level of the manifest")
    cls = ALGOS[algo].config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    if "codec" in names:
        table = dict(table, codec=codec)
    elif codec != "none":
        raise ConfigError(f"{top}: codec: {algo} sends no tensors; codec must be 'none', "
                          f"got {codec!r}")
    return _build(cls, table, where)


def from_dict(d: Any, *, where: str = "manifest") -> Manifest:
    """A validated Manifest from the TOML (or decoded canonical) dict; ConfigError if not."""
    d = _table(d, where)
    unknown = sorted(set(d) - set(TOP) - set(ALGOS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: "
                          f"{', '.join(sorted(TOP + tuple(ALGOS)))})")
    fmt = d.get("format", FORMAT)
    if type(fmt) is not int or fmt != FORMAT:
        raise ConfigError(f"{where}: format {fmt!r} is not supported (this is format "
                          f"{FORMAT}: a newer byteswarm may read it)"[:200])
    name = _str(d, "name", where)
    if not NAME.match(name):
        raise ConfigError(f"{where}: name {name!r} must be 1-64 letters, digits, . _ or -, "
                          "starting with a letter or digit"[:200])
    algo = _str(d, "algorithm", where)
    if algo not in ALGOS:
        raise ConfigError(f"{where}: algorithm must be one of {', '.join(ALGOS)}; "
                          f"got {algo!r}"[:200])
    for other in ALGOS:
        if other != algo and other in d:
            raise ConfigError(f"{where}: table [{other}] given, but algorithm is {algo!r}")
    codec = _str(d, "codec", where, "none")
    if codec not in CODECS:
        raise ConfigError(f"{where}: codec must be one of {', '.join(CODECS)}; "
                          f"got {codec!r}"[:200])
    creator = _key(d.get("creator"), f"{where}: creator")
    admission = _str(d, "admission", where, "open")
    if admission not in ADMISSION:
        raise ConfigError(f"{where}: admission must be open or allowlist; got {admission!r}"
                          [:200])
    raw_list = d.get("allowlist", [])
    if not isinstance(raw_list, list):
        raise ConfigError(f"{where}: allowlist must be a list of hex keys")
    if len(raw_list) > MAX_ALLOWLIST:
        raise ConfigError(f"{where}: allowlist has {len(raw_list)} keys, at most "
                          f"{MAX_ALLOWLIST}: admit more with tokens")
    allowlist = [_key(k, f"{where}: allowlist[{i}]") for i, k in enumerate(raw_list)]
    if len(set(allowlist)) != len(allowlist):
        raise ConfigError(f"{where}: allowlist names a key twice")
    if admission == "open" and allowlist:
        raise ConfigError(f"{where}: allowlist given, but admission is 'open'")

    model = _build(ModelConfig, _table(d.get("model", {}), f"{where} [model]"),
                   f"{where} [model]").resolved()
    data = dict(_table(d.get("data", {}), f"{where} [data]"))
    if "data" in data:
        raise ConfigError(f"{where} [data]: a local path cannot go in a manifest: set "
                          "corpus = 'stdlib' or corpus = 'sha256:<hex of the file>'")
    corpus = data.pop("corpus", "stdlib")
    if corpus != "stdlib" and not (isinstance(corpus, str) and STDLIB_PIN.match(corpus)):
        corpus = _sha(corpus, f"{where} [data]: corpus ('stdlib' or a file's hash)")
    data_cfg = _build(DataConfig, dict(data, data=corpus), f"{where} [data]")
    init = _table(d.get("init", {}), f"{where} [init]")
    bad = sorted(set(init) - {"seed", "weights", "task"})
    if bad:
        raise ConfigError(f"{where} [init]: unknown key {bad[0]!r} (known: seed, weights, "
                          "task)")
    task = init.get("task")
    if task is not None and not (isinstance(task, str) and TASK_SPEC.match(task)):
        raise ConfigError(f"{where} [init]: task must be module:attr or file.py:attr, at "
                          f"most 200 characters; got {task!r}"[:300])
    seed = init.get("seed", 0)
    if type(seed) is not int or not 0 <= seed <= 2**62:
        raise ConfigError(f"{where} [init]: seed must be an integer in [0, 2^62], "
                          f"got {seed!r}"[:200])
    weights = init.get("weights")
    if weights is not None:
        weights = _sha(weights, f"{where} [init]: weights")

    cfg = _algorithm_config(algo, _table(d.get(algo, {}), f"{where} [{algo}]"), codec, where)
    params = tuple(sorted((k, v) for k, v in dataclasses.asdict(cfg).items()
                          if k not in DERIVED and k not in LOCAL and k != "codec"))
    return Manifest(name, algo, codec, creator, admission, tuple(sorted(allowlist)), model,
                    data_cfg, seed, weights, params, task)


def parse(text: str, *, where: str = "manifest") -> Manifest:
    """A Manifest from TOML text; ConfigError (one sentence) for any problem."""
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML ({e})") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise ConfigError(f"{where}: not valid TOML (nested too deeply)") from None
    return from_dict(d, where=where)


def load(path: str | Path) -> Manifest:
    """A Manifest from a TOML file; ConfigError for a missing file or any bad value."""
    try:
        d = load_toml(path)
    except RecursionError:  # as in parse()
        raise ConfigError(f"{path}: not valid TOML (nested too deeply)") from None
    return from_dict(d, where=str(path))


def check_file(path: str | Path, sha: str, *, what: str) -> None:
    """ConfigError unless the file's sha256 is ``sha`` ("sha256:<hex>")."""
    h = hashlib.sha256()
    try:
        with Path(path).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise ConfigError(f"manifest: cannot read the {what} file {path}: {e}") from None
    if "sha256:" + h.hexdigest() != sha:
        raise ConfigError(f"manifest: {path} is not the swarm's {what} file (sha256 "
                          f"{h.hexdigest()[:16]}…, expected {sha[7:23]}…)")


# --- canonical bytes and the swarm id --------------------------------------------------------


def to_dict(m: Manifest) -> dict[str, Any]:
    """The manifest as plain values; ``from_dict(to_dict(m)) == m``."""
    d: dict[str, Any] = {
        "format": FORMAT, "name": m.name, "algorithm": m.algorithm, "codec": m.codec,
        "creator": m.creator.hex(), "admission": m.admission,
        "allowlist": [k.hex() for k in m.allowlist],
        "model": dataclasses.asdict(m.model),
        "data": {("corpus" if k == "data" else k): v
                 for k, v in dataclasses.asdict(m.data).items()},
        "init": {"seed": m.seed, **({"weights": m.weights} if m.weights else {}),
                 **({"task": m.task} if m.task else {})},
        m.algorithm: dict(m.params),
    }
    return d


def _sorted(obj: Any) -> Any:
    """``obj`` with every map's keys sorted. Recursive, so only for values whose depth is
    known: ``to_dict``'s output, or ones that passed ``msgshape.check_shape``."""
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_sorted(v) for v in obj]
    return obj


def _prune(full: Any, like: Any) -> Any:
    """``full`` restricted to the map keys that ``like`` has, at every depth (no deeper than
    ``full``, which is ``to_dict``'s output)."""
    if isinstance(full, dict) and isinstance(like, dict):
        return {k: _prune(full[k], like[k]) for k in like if k in full}
    return full


def canonical_bytes(m: Manifest) -> bytes:
    """The manifest's canonical bytes: the ones it was decoded from, else ``to_dict``'s."""
    if m._canonical is not None:
        return m._canonical
    return pack(_sorted(to_dict(m)))


def swarm_id(m: Manifest | bytes) -> str:
    """``bs1…`` (protocols/swarmid.py) of the canonical bytes; ``m`` may be those bytes."""
    return swarmid.of_bytes(m if isinstance(m, bytes) else canonical_bytes(m))


# --- signing and verification -------------------------------------------------------------


@dataclass(frozen=True)
class SignedManifest:
    manifest: Manifest
    signature: bytes  # Ed25519 by manifest.creator over SIGN_TAG ‖ canonical bytes

    @property
    def swarm_id(self) -> str:
        return swarm_id(self.manifest)

    def to_bytes(self) -> bytes:
        """What travels: msgpack ``[FORMAT, canonical, signature]``."""
        return pack([FORMAT, canonical_bytes(self.manifest), self.signature])


def sign(m: Manifest, key: Ed25519PrivateKey) -> SignedManifest:
    """The creator's signature on ``m``; ConfigError if ``key`` is not the creator's."""
    if public_key_bytes(key) != m.creator:
        raise ConfigError("manifest: the signing key is not the manifest's creator "
                          f"(creator {m.creator.hex()[:16]}…, key "
                          f"{public_key_bytes(key).hex()[:16]}…)")
    return SignedManifest(m, sign_bytes(key, SIGN_TAG, canonical_bytes(m)))


def _unpack(blob: Any) -> tuple[bytes, bytes]:
    """(canonical, signature) from a signed blob: size and shape only."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise Rejected("malformed", "not bytes")
    if len(blob) > MAX_SIGNED:
        raise Rejected("oversized", f"{len(blob)} > {MAX_SIGNED} bytes")
    blob = bytes(blob)
    check_shape(blob, 1, "malformed")  # one array of scalars
    try:
        obj = msgpack.unpackb(blob, raw=False, max_str_len=0, max_bin_len=MAX_SIGNED,
                              max_array_len=3, max_map_len=0, max_ext_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError, UnicodeDecodeError) as e:
        raise Rejected("malformed", type(e).__name__) from None
    if not (isinstance(obj, list) and len(obj) == 3):
        raise Rejected("malformed", "not a 3-element signed manifest")
    fmt, canonical, signature = obj
    if type(fmt) is not int or fmt != FORMAT:
        raise Rejected("bad_version", repr(fmt)[:40])
    if not isinstance(canonical, bytes):
        raise Rejected("bad_field", "manifest is not bytes")
    if not isinstance(signature, bytes) or len(signature) != SIG_BYTES:
        raise Rejected("bad_field", f"signature is not {SIG_BYTES} bytes")
    return canonical, signature


def from_canonical(canonical: bytes) -> Manifest:
    """A Manifest from canonical bytes, or Rejected (``bad_manifest``, ``not_canonical``)."""
    if not isinstance(canonical, (bytes, bytearray, memoryview)):
        raise Rejected("bad_manifest", "not bytes")
    if len(canonical) > MAX_SIGNED:
        raise Rejected("bad_manifest", f"{len(canonical)} > {MAX_SIGNED} bytes")
    canonical = bytes(canonical)
    check_shape(canonical, MAX_DEPTH, "bad_manifest")
    try:
        d = msgpack.unpackb(canonical, raw=False, strict_map_key=True, max_str_len=256,
                            max_bin_len=0, max_array_len=MAX_ALLOWLIST, max_map_len=64,
                            max_ext_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError, UnicodeDecodeError) as e:
        raise Rejected("bad_manifest", f"not msgpack ({type(e).__name__})") from None
    check_ints(d)
    try:
        m = from_dict(d)
    except ConfigError as e:
        raise Rejected("bad_manifest", str(e)) from None
    # Keys the bytes leave out take this reader's defaults: a manifest written before a
    # config field existed stays valid (a new field must default to the old behaviour).
    if pack(_sorted(_prune(to_dict(m), d))) != canonical:
        raise Rejected("not_canonical", "fields valid, but not in canonical form")
    object.__setattr__(m, "_canonical", bytes(canonical))
    return m


def decode_signed(blob: bytes) -> SignedManifest:
    """A signed manifest's bytes to a SignedManifest: shape and fields validated, the
    signature and id not checked (``verify`` does both)."""
    canonical, signature = _unpack(blob)
    return SignedManifest(from_canonical(canonical), signature)


def verify(signed: bytes | SignedManifest, expected_swarm_id: str) -> Manifest:
    """The manifest, if ``signed`` is the one ``expected_swarm_id`` names and its creator
    signed it; else Rejected with the reason (see the module docstring for the order)."""
    if isinstance(signed, SignedManifest):
        canonical, signature = canonical_bytes(signed.manifest), signed.signature
    else:
        canonical, signature = _unpack(signed)
    got = swarm_id(canonical)
    if got != expected_swarm_id:
        raise Rejected("id_mismatch", f"the manifest was changed: its id is {got}, "
                       f"expected {str(expected_swarm_id)[:60]}")
    m = from_canonical(canonical)
    if not verify_bytes(m.creator, SIGN_TAG, canonical, signature):
        raise Rejected("bad_signature", "not signed by the manifest's creator key")
    return m

