"""tinylm: a byte-level GPT-style language model trained on Python's own standard library source.

The text is the top-level ``*.py`` files of the running interpreter's stdlib (about 4.7 MB on
CPython 3.11), already on disk, so nothing is downloaded and no tokenizer is needed: every byte is
a token (vocabulary 256).

Run it::

    python -m forge recipe=tinylm                                  # CPU-sized default
    python -m forge recipe=tinylm recipe.params.n_layer=4 trainer.max_steps=1000
    python -m forge recipe=tinylm recipe.params.max_files=10      # a small slice, for smoke tests
    python -m forge recipe=tinylm_gpt2 precision=bf16              # GPT-2 124M shape, for GPUs

Benchmarks compute model FLOPs utilisation from :func:`num_params` and :func:`flops_per_token`.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

import forge

VOCAB_SIZE = 256  # one token per byte


@dataclass
class Params:
    """Knobs for this recipe; set them as ``recipe.params.<name>=...``."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128  # must be divisible by n_head
    block_size: int = 128  # context length in bytes
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm; GPT-2 had them, they barely help
    max_files: int | None = None  # use only the first N stdlib files (tests, smoke runs)
    val_fraction: float = 0.05  # the last bytes of the corpus, so train and val never overlap


# --------------------------------------------------------------------------------------------
# Data


def load_corpus(max_files: int | None = None) -> torch.Tensor:
    """The stdlib's top-level ``.py`` files, concatenated, as a 1-D uint8 tensor.

    Files are sorted by name so every worker (same Python version) sees the same bytes.

    Args:
        max_files: Keep only the first ``max_files`` files; None keeps them all.

    Returns:
        The corpus, one element per byte.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"), key=lambda p: p.name)[:max_files]
    if not files:
        raise forge.ConfigError(f"tinylm: no .py files found in the standard library at {stdlib}.")
    # A blank line between files keeps one file's end from running into the next one's start.
    text = b"\n\n".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


class ByteWindows(Dataset):
    """Non-overlapping windows of a byte sequence: item ``i`` is ``(x, y)`` with ``y`` = ``x``
    shifted left by one byte.

    Windows do not overlap so an epoch visits every byte once and has a well-defined length.
    """

    def __init__(self, data: torch.Tensor, block_size: int) -> None:
        self.data = data
        self.block_size = block_size

    def __len__(self) -> int:
        # Each window needs block_size + 1 bytes (its inputs plus one more target).
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.block_size
        chunk = self.data[start : start + self.block_size + 1].long()  # embeddings need int64
        return chunk[:-1], chunk[1:]


def split_corpus(
    data: torch.Tensor, block_size: int, val_fraction: float
) -> tuple[ByteWindows, ByteWindows]:
    """Split by position: the last ``val_fraction`` of the bytes is the validation set."""
    n_train = len(data) - int(len(data) * val_fraction)
    train = ByteWindows(data[:n_train], block_size)
    val = ByteWindows(data[n_train:], block_size)
    if len(train) == 0 or len(val) == 0:
        raise forge.ConfigError(
            f"tinylm: {len(data):,} bytes give {len(train)} train and {len(val)} validation "
            f"windows of block_size={block_size}. Raise recipe.params.max_files or "
            "recipe.params.val_fraction, or lower recipe.params.block_size."
        )
    return train, val


# --------------------------------------------------------------------------------------------
# Model


class CausalSelfAttention(nn.Module):
    def __init__(self, p: Params) -> None:
        super().__init__()
        if p.n_embd % p.n_head:
            raise forge.ConfigError(
                f"tinylm: n_embd={p.n_embd} must be divisible by n_head={p.n_head}."
            )
        self.n_head = p.n_head
        self.dropout = p.dropout
        self.qkv = nn.Linear(p.n_embd, 3 * p.n_embd, bias=p.bias)
        self.proj = nn.Linear(p.n_embd, p.n_embd, bias=p.bias)
        self.resid_dropout = nn.Dropout(p.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim) tensors.
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(C, dim=2)
        )
        # Fused kernel (flash / memory-efficient where available); is_causal masks the future.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, p: Params) -> None:
        super().__init__()
        self.fc = nn.Linear(p.n_embd, 4 * p.n_embd, bias=p.bias)
        self.proj = nn.Linear(4 * p.n_embd, p.n_embd, bias=p.bias)
        self.dropout = nn.Dropout(p.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: normalise, transform, add back to the residual stream."""

    def __init__(self, p: Params) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(p.n_embd, bias=p.bias)
        self.attn = CausalSelfAttention(p)
        self.ln2 = nn.LayerNorm(p.n_embd, bias=p.bias)
        self.mlp = MLP(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A GPT-2-style decoder: ``(B, T)`` byte ids in, ``(B, T, 256)`` next-byte logits out."""

    def __init__(self, p: Params) -> None:
        super().__init__()
        self.block_size = p.block_size
        self.tok_emb = nn.Embedding(VOCAB_SIZE, p.n_embd)
        self.pos_emb = nn.Embedding(p.block_size, p.n_embd)
        self.drop = nn.Dropout(p.dropout)
        self.blocks = nn.ModuleList(Block(p) for _ in range(p.n_layer))
        self.ln_f = nn.LayerNorm(p.n_embd, bias=p.bias)
        self.head = nn.Linear(p.n_embd, VOCAB_SIZE, bias=False)
        # Weight tying: the output layer reuses the input embedding (fewer params, trains better).
        self.head.weight = self.tok_emb.weight

        # GPT-2 init: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth.
        # All of it through apply(): under ZeRO-3 with strategy.zero_init=true parameters are
        # partitioned as they are built, and DeepSpeed gathers them only for apply().
        residual_std = 0.02 / math.sqrt(2 * p.n_layer)
        projections = {id(m) for name, m in self.named_modules() if name.endswith(".proj")}
        self.apply(lambda m: self._init_weights(m, residual_std if id(m) in projections else 0.02))

    @staticmethod
    def _init_weights(module: nn.Module, std: float) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def num_params(model: nn.Module) -> int:
    """Number of distinct parameters (the tied embedding/head weight counts once)."""
    return sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates


def flops_per_token(params: Params, n_params: int) -> float:
    """Training FLOPs (forward + backward) per token: ``6N + 12 * L * d * T``.

    ``6N`` covers the matmuls with the weights; the second term is attention's ``QK^T`` and
    ``AV`` (PaLM paper, appendix B). Divide achieved FLOP/s by peak for MFU.
    """
    return 6.0 * n_params + 12.0 * params.n_layer * params.n_embd * params.block_size


# --------------------------------------------------------------------------------------------
# Recipe


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.view(-1, VOCAB_SIZE), y.view(-1))


def eval_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    # One value per token (B * T of them): every window has the same length, so the mean over
    # tokens equals the mean over windows and forge's average is the usual per-token loss.
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits.view(-1, VOCAB_SIZE), y.view(-1), reduction="none")}


def train_data(params: Params) -> ByteWindows:
    """The training windows alone (forge profiles them on the driver, without a model)."""
    return split_corpus(load_corpus(params.max_files), params.block_size, params.val_fraction)[0]


def build(params: Params) -> forge.Recipe:
    """Build the model and data; forge calls this once on every worker."""
    data = load_corpus(params.max_files)
    train_data, val_data = split_corpus(data, params.block_size, params.val_fraction)
    return forge.Recipe(
        model=lambda: TinyLM(params),  # built by forge (strategy.zero_init: partitioned)
        train_data=train_data,
        val_data=val_data,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        tokens_per_sample=params.block_size,  # forge logs throughput/tokens_per_s
        export=export_spec(params, val_data),
    )


def export_spec(params: Params, val_data: ByteWindows) -> forge.ExportSpec:
    """What the served model takes: byte ids, any batch size and any length up to block_size."""

    def example(n: int) -> tuple[torch.Tensor]:
        windows = torch.stack([val_data[i % len(val_data)][0] for i in range(n)])
        return (windows,)

    return forge.ExportSpec(
        input_names=("idx",),
        output_names=("logits",),
        example=example,
        dynamic_dims={"idx": {0: "batch", 1: "seq"}},
        max_dims={"seq": params.block_size},
        task="next_token",
        preprocessing=f"Text as UTF-8 bytes, one int64 id per byte (0..255), rows of at most "
        f"{params.block_size} ids. logits[:, t] scores the byte after position t.",
    )
