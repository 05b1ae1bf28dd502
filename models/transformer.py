"""Transformer encoder classifier over N x T x F sequences (T dynamic), optional padding mask."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .registry import InputSpec, ModelSpec, register_model


@dataclass(frozen=True)
class TransformerConfig:
    input_size: int = 8       # F; ignored when vocab_size > 0 (token ids instead)
    seq_len: int = 8
    vocab_size: int = 0       # > 0: token embedding over int64 ids instead of a projection
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    ff: int = 128
    max_len: int = 512
    num_classes: int = 10
    dropout: float = 0.1
    # A structurally pruned model: heads and FFN width per layer (empty: `heads` / `ff` everywhere); the
    # width of one head stays d_model // heads.
    layer_heads: tuple[int, ...] = ()
    layer_ff: tuple[int, ...] = ()

    def __post_init__(self):
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        for k in ("input_size", "seq_len", "d_model", "heads", "layers", "ff", "max_len", "num_classes"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.seq_len > self.max_len:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds max_len ({self.max_len})")
        for k in ("layer_heads", "layer_ff"):
            values = tuple(int(v) for v in getattr(self, k))     # JSON gives lists
            object.__setattr__(self, k, values)
            if values and (len(values) != self.layers or min(values) < 1):
                raise ValueError(f"{k} needs one value >= 1 per layer ({self.layers}), got {list(values)}")

    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len,) if self.vocab_size else (self.seq_len, self.input_size)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def heads_of(self, layer: int) -> int:
        return self.layer_heads[layer] if self.layer_heads else self.heads

    def ff_of(self, layer: int) -> int:
        return self.layer_ff[layer] if self.layer_ff else self.ff


class EncoderBlock(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + FFN(LN(x)). Attention is F.scaled_dot_product_attention."""

    def __init__(self, cfg: TransformerConfig, layer: int = 0):
        super().__init__()
        self.heads, self.head_dim = cfg.heads_of(layer), cfg.head_dim
        self.inner = self.heads * self.head_dim                           # d_model unless heads were pruned
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * self.inner)
        self.proj = nn.Linear(self.inner, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        ff = cfg.ff_of(layer)
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, ff), nn.GELU(), nn.Linear(ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(self.inner, dim=-1)         # 3 x (B, T, h*c)
        q, k, v = (t.view(B, T, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, h, T, c)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, T, c)
        y = y.transpose(1, 2).reshape(B, T, self.inner)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.ff(self.ln2(x)))


class TransformerClassifier(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.vocab_size:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        else:
            self.embed = nn.Linear(cfg.input_size, cfg.d_model)
        self.register_buffer("pos", _sinusoid(cfg.max_len, cfg.d_model), persistent=False)
        self.blocks = nn.ModuleList(EncoderBlock(cfg, i) for i in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)

    def forward(self, sequence: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """sequence: (N, T, F) floats or (N, T) ids; mask: (N, T) bool, True = real token."""
        x = self.embed(sequence)                           # (N, T, C)
        x = x + self.pos[: x.shape[1]]
        # (N, 1, T, T): every query row gets the key mask. Expanded rather than broadcast from (N, 1, 1, T):
        # ONNX Runtime's Attention kernel requires the mask's query axis to match the queries.
        T = x.shape[1]
        attn_mask = None if mask is None else mask[:, None, None, :].expand(-1, 1, T, -1)
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.ln(x)
        if mask is None:
            pooled = x.mean(dim=1)
        else:
            w = mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.head(pooled)                           # (N, num_classes)


def transformer_inputs(cfg: TransformerConfig) -> tuple[InputSpec, ...]:
    """Float rows (N, T, F); or, with vocab_size > 0, token ids (N, T) and their padding mask (N, T)."""
    axes = {0: "batch", 1: "seq_len"}
    if not cfg.vocab_size:
        return (InputSpec("sequence", (cfg.seq_len, cfg.input_size), axes),)
    return (InputSpec("sequence", (cfg.seq_len,), axes, "int64", role="tokens", high=cfg.vocab_size),
            InputSpec("mask", (cfg.seq_len,), dict(axes), "bool", role="mask"))


def _sinusoid(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return pe


SPEC = register_model(
    ModelSpec(
        name="transformer",
        family="sequence",
        config_cls=TransformerConfig,
        build=TransformerClassifier,
        inputs=(InputSpec("sequence", (8, 8), {0: "batch", 1: "seq_len"}),),
        input_fn=transformer_inputs,
        data_fields=("seq_len", "input_size"),
        # 3 seeds on digits: d_model 32 lost 1.6 points to the teacher on average; 48 stays within 1.5
        student={"d_model": 48, "ff": 96, "layers": 1},
        sizes={"base": {"d_model": 256, "heads": 8, "layers": 4, "ff": 1024}},
        train_defaults={"epochs": 40, "lr": 1e-3, "patience": 12},
        opset=23,  # F.scaled_dot_product_attention -> the native ONNX Attention op
        description="pre-norm Transformer encoder (SDPA attention, mean pooled) over N x T x F sequences",
    )
)
