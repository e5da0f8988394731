"""A Hugging Face ``transformers`` task: a small GPT-2 learning bytes, nothing downloaded.

The model is built from a ``GPT2Config`` (256 byte values, a 64-byte context, 2 layers of
width 64: 0.12M parameters), not fetched from the hub. Every peer must start from the same
weights, so ``build()`` seeds torch's generator just for the construction (inside
``fork_rng``, leaving the caller's alone): ``transformers`` initialises with the global
generator. Or every peer loads one safetensors file: ``save_weights(model, path)`` writes
it, ``HFTask(weights=path)`` builds from it after checking its names and shapes.

Dropout is off. A dropped-out forward pass is a random function, so SPSA's two perturbed
losses would differ by noise as large as the signal, and replicas that must stay
bit-identical would not. ``use_cache`` is off too: training has no use for past keys.

The data are the project's embedded corpus (the Python standard library's source, read as
bytes; byteswarm/optim/data.py): peer k of n reads shard k, and ``batch(step)`` is a pure
function of (seed, k, n, step). The loss calls the model with the keyword ``input_ids``
and computes cross-entropy itself against y, which is x shifted by one byte already;
given ``labels``, GPT-2 would shift them once more. The model may be a stand-in callable
(the simulator's batched mode goes through ``torch.func.functional_call``), so the task
only calls it.

Run it (from the repository root; needs ``pip install 'byteswarm[hf]'``)::

    byteswarm sim --task examples/hf_task.py:task --algo noloco,diloco --scenario datacenter \\
        --peers 4 --steps 200 --out runs/hf-sim
    byteswarm node --task examples/hf_task.py:task --algo noloco --steps 200 \\
        --out runs/hf-node

The node starts a swarm and prints the address others join with (``listening on
MADDR``): a second peer runs the same command with ``--initial-peers MADDR`` and its own
``--out``.

To start a swarm from a weights file, write a module of your own holding
``task = HFTask(weights="init.safetensors")`` and give every peer the same file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from byteswarm.optim.config import ConfigError
from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.workload import LMBatches
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a weights file holds: each parameter once, under its first name. GPT-2's output
    layer is its input embedding (tied), so ``lm_head.weight`` is saved as
    ``transformer.wte.weight`` only; safetensors refuses two names for one tensor."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s weights to ``path`` as safetensors (``HFTask(weights=path)``)."""
    save_file(weights_of(model), str(path))


def load_weights_(model: nn.Module, path: str | Path) -> None:
    """Load a ``save_weights`` file into ``model``, refusing one that is not its weights:
    other names, other shapes, or not finite floats."""
    try:
        got = load_file(str(path))
    except Exception as e:  # missing, or not safetensors
        raise ConfigError(f"weights: cannot read {path}: {type(e).__name__}: {e}"[:300]) \
            from None
    want = weights_of(model)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ConfigError(f"weights: {path} holds another model's weights: missing "
                          f"{missing[:3] or 'none'}, unexpected {extra[:3] or 'none'}"[:300])
    for name, ref in want.items():
        t = got[name]
        if t.shape != ref.shape:
            raise ConfigError(f"weights: {path}: {name} has shape {tuple(t.shape)}, the model "
                              f"wants {tuple(ref.shape)}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ConfigError(f"weights: {path}: {name} is not a finite float tensor")
    # strict=False only for the tied aliases the file leaves out, checked just below.
    result = model.load_state_dict({n: t.float() for n, t in got.items()}, strict=False)
    aliases = set(model.state_dict()) - set(want)
    if result.unexpected_keys or not set(result.missing_keys) <= aliases:
        raise ConfigError(f"weights: {path} did not load: {result}"[:300])


@functools.lru_cache(maxsize=2)
def load_corpus(max_bytes: int) -> Corpus:
    """The standard library's bytes, read once per process (a few seconds) for all tasks."""
    return Corpus.load(DataConfig(max_bytes=max_bytes))


@dataclass(frozen=True, kw_only=True)
class HFTask:
    """Numbers and a file name only; the corpus is read (once, lazily) from them."""

    seed: int = 0
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    seq_len: int = 64  # the context, n_positions
    tie_embeddings: bool = True  # GPT-2's: the output layer is the input embedding
    batch_size: int = 16
    val_batches_count: int = 4
    max_bytes: int = 2_000_000  # of the corpus
    weights: str | None = None  # a save_weights file; None: initialise from the seed

    @property
    def name(self) -> str:
        return f"hf-gpt2-{self.n_layer}x{self.n_embd}"

    def config(self) -> GPT2Config:
        return GPT2Config(vocab_size=256, n_positions=self.seq_len, n_embd=self.n_embd,
                          n_layer=self.n_layer, n_head=self.n_head,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          tie_word_embeddings=self.tie_embeddings, use_cache=False,
                          bos_token_id=None, eos_token_id=None)  # bytes have no such tokens

    @property
    def _corpus(self) -> Corpus:
        corpus = load_corpus(self.max_bytes)
        corpus.check_fits(self.seq_len)
        return corpus

    # -- the task interface (byteswarm/optim/task.py)
    def build(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = GPT2LMHeadModel(self.config())
        if self.weights is not None:
            load_weights_(model, self.weights)
        return model

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch  # (B, T) int64 each, y = x shifted by one byte
        logits = model(input_ids=x).logits  # (B, T, 256)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def batches(self, k: int, n: int) -> LMBatches:
        return LMBatches(self._corpus.shard(k, n, seed=self.seed), self.batch_size,
                           self.seq_len)

    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._corpus.val_set(self.batch_size, self.seq_len, self.val_batches_count,
                                    seed=self.seed)


task = HFTask()
