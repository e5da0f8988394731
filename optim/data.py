"""The embedded corpus: text every machine already has, split into train/val and shards.

By default the corpus is the Python standard library's own source (found through
``sysconfig``, test suites left out), read as bytes, so a run needs no download. A user may
point ``data`` at any local text file or folder instead. Documents are split into train and
validation by a hash of their relative path, so the split does not depend on file order or
on how many files there are.

The standard library's bytes differ between Python versions, so a swarm whose peers must
read the same bytes (SPSA spot checks recompute each other's records) pins its corpus:
``stdlib_pin`` names the Python version and hashes the corpus as loaded, and
``check_stdlib_pin`` refuses a machine whose stdlib hashes otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, opt
from .seeds import derive_seed

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".html"}
BLOCK = 4096  # bytes per block when dealing IID shards
STDLIB_PIN = re.compile(r"^stdlib-([0-9][0-9A-Za-z.+-]{0,31}):sha256:([0-9a-f]{64})$")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    data: str = opt("stdlib", "'stdlib' (the Python standard library's source, on every "
                    "machine) or a path to a local text file or folder")
    max_bytes: int = opt(16_000_000, "read at most this many bytes of corpus", lo=10_000)
    val_fraction: float = opt(0.05, "fraction of documents held out for validation",
                              lo=0.0, hi=0.5, lo_open=True)
    batch_size: int = opt(32, "sequences per batch", lo=1, hi=4096)
    val_batches: int = opt(8, "fixed validation batches (same on every peer)", lo=1, hi=1000)
    non_iid: bool = opt(False, "give each peer a contiguous, topically clustered shard "
                        "instead of an IID deal of blocks")


@functools.lru_cache(maxsize=4)
def stdlib_pin(cfg: DataConfig) -> str:
    """``stdlib-<python version>:sha256:<hex>`` of this machine's embedded corpus, as
    ``cfg`` (its size limit and split) loads it. Cached: ``swarm create`` pins and then
    checks the same corpus."""
    c = Corpus.load(dataclasses.replace(cfg, data="stdlib"))
    h = hashlib.sha256()
    for part in (c.train, c.val):
        h.update(part.numel().to_bytes(8, "little"))
        h.update(part.numpy().tobytes())
    return f"stdlib-{platform.python_version()}:sha256:{h.hexdigest()}"


def check_stdlib_pin(pin: str, cfg: DataConfig) -> None:
    """ConfigError unless this machine's standard library loads as ``pin`` says."""
    m = STDLIB_PIN.match(pin)
    if m is None:
        raise ConfigError(f"data: {pin!r} is not 'stdlib-<version>:sha256:<64 hex>'"[:200])
    mine = stdlib_pin(cfg)
    if mine != pin:
        raise ConfigError(
            f"data: this swarm trains on the standard library of Python {m.group(1)} "
            f"(sha256 {m.group(2)[:16]}…), but this machine's, Python "
            f"{platform.python_version()}, reads as sha256 {mine[-64:-48]}…; peers on other "
            f"bytes would fail each other's checks. Run byteswarm under Python {m.group(1)}.")


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _documents(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"data: {root} is neither a file nor a folder")
    docs = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]  # not walked at all
        docs += [p for p in map(Path(dirpath).joinpath, filenames)
                 if p.suffix in TEXT_SUFFIXES and p.is_file()]
    docs.sort(key=lambda p: p.relative_to(root).as_posix())
    if not docs:
        raise ConfigError(f"data: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) "
                          f"under {root}")
    return docs


def _is_val(rel: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=4).digest(), "little")
    return h / 2**32 < fraction


class Corpus:
    """Train and validation byte streams, as uint8 tensors."""

    def __init__(self, train: torch.Tensor, val: torch.Tensor, source: str):
        self.train = train  # (N_train,) uint8
        self.val = val  # (N_val,) uint8
        self.source = source

    @classmethod
    def load(cls, cfg: DataConfig) -> Corpus:
        root = _stdlib_root() if cfg.data == "stdlib" else Path(cfg.data).expanduser()
        docs = _documents(root)
        train, val, total = [], [], 0
        for p in docs:
            if total >= cfg.max_bytes:
                break
            blob = p.read_bytes()[: cfg.max_bytes - total]
            total += len(blob)
            rel = p.name if root.is_file() else p.relative_to(root).as_posix()
            (val if _is_val(rel, cfg.val_fraction) else train).append(blob)
        if root.is_file() or not val:
            # One document (or an unlucky hash): hold out its tail instead.
            blob = b"".join(train + val)
            cut = int(len(blob) * (1 - cfg.val_fraction))
            train, val = [blob[:cut]], [blob[cut:]]
        to_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
        return cls(to_tensor(train), to_tensor(val), str(root))

    def check_fits(self, seq_len: int) -> None:
        for name, t in (("train", self.train), ("validation", self.val)):
            if t.numel() < 2 * (seq_len + 1):
                raise ConfigError(f"data: the {name} split of {self.source} has only "
                                  f"{t.numel()} bytes; need at least {2 * (seq_len + 1)}")

    def shard(self, k: int, n: int, *, non_iid: bool = False, seed: int = 0) -> Shard:
        """Peer k of n's part of the training stream (deterministic in k, n, seed)."""
        if not 0 <= k < n:
            raise ValueError(f"shard index {k} outside 0..{n - 1}")
        data = self.train
        if n == 1:
            return Shard(data, k, n, seed)
        if non_iid:
            lo, hi = data.numel() * k // n, data.numel() * (k + 1) // n
            return Shard(data[lo:hi], k, n, seed)
        n_blocks = data.numel() // BLOCK
        g = torch.Generator().manual_seed(derive_seed("deal", seed) & (2**63 - 1))
        order = torch.randperm(n_blocks, generator=g)
        mine = order[k::n].sort().values
        blocks = data[: n_blocks * BLOCK].view(n_blocks, BLOCK)[mine].reshape(-1)
        return Shard(blocks, k, n, seed)

    def val_set(self, batch_size: int, seq_len: int, count: int,
                seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of validation batches: same seed, same batches, on every peer."""
        return [sample(self.val, batch_size, seq_len, derive_seed("val", seed, i))
                for i in range(count)]


def sample(stream: torch.Tensor, batch_size: int, seq_len: int,
           seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of a byte stream -> x, y (B, T) int64, y shifted by one."""
    g = torch.Generator().manual_seed(seed & (2**63 - 1))
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T+1)
    window = stream[idx].long()
    return window[:, :-1], window[:, 1:]


@dataclass(frozen=True)
class Shard:
    """One peer's training bytes; ``batch(step)`` is a pure function of (seed, k, step),
    so anyone holding the public shard can rebuild the batch a peer used at a step."""

    data: torch.Tensor
    k: int
    n: int
    seed: int

    def batch(self, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
        return sample(self.data, batch_size, seq_len,
                      derive_seed("batch", self.seed, self.k, self.n, step))
