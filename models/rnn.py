"""Gated RNN sequence classifiers (LSTM and GRU) over N x T x F inputs, T dynamic."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .registry import InputSpec, ModelSpec, register_model


@dataclass(frozen=True)
class RNNConfig:
    cell: str = "lstm"          # "lstm" or "gru"
    input_size: int = 8         # F: features per time step (one image row for digits)
    seq_len: int = 8            # T the model is trained on; the export keeps T dynamic
    hidden: int = 64
    layers: int = 1
    num_classes: int = 10
    dropout: float = 0.0
    # Per-layer hidden widths (a structurally pruned model); empty: `hidden` for every layer.
    layer_hidden: tuple[int, ...] = ()

    def __post_init__(self):
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {self.cell!r}")
        for k in ("input_size", "seq_len", "hidden", "layers", "num_classes"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        object.__setattr__(self, "layer_hidden", tuple(int(h) for h in self.layer_hidden))  # JSON gives lists
        if self.layer_hidden and (len(self.layer_hidden) != self.layers or min(self.layer_hidden) < 1):
            raise ValueError(f"layer_hidden needs one width >= 1 per layer ({self.layers}), got {list(self.layer_hidden)}")

    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len, self.input_size)

    def widths(self) -> tuple[int, ...]:
        """The hidden width of every layer."""
        return self.layer_hidden or (self.hidden,) * self.layers


def rnn_key(cfg: RNNConfig, layer: int, name: str) -> str:
    """The state_dict key of one layer's parameter (name: weight_ih, weight_hh, bias_ih, bias_hh): a uniform
    stack is one nn.LSTM/nn.GRU (rnn.weight_ih_l1), per-layer widths are a stack of one-layer RNNs
    (rnn.layers.1.weight_ih_l0)."""
    return f"rnn.layers.{layer}.{name}_l0" if cfg.layer_hidden else f"rnn.{name}_l{layer}"


class RNNStack(nn.Module):
    """One-layer RNNs of different widths, stacked (what a pruned multi-layer RNN becomes)."""

    def __init__(self, rnn_cls, input_size: int, widths: tuple[int, ...], dropout: float):
        super().__init__()
        sizes = (input_size, *widths)
        self.layers = nn.ModuleList(rnn_cls(sizes[i], sizes[i + 1], batch_first=True) for i in range(len(widths)))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor):
        for i, layer in enumerate(self.layers):
            x, _ = layer(self.drop(x) if i else x)     # (N, T, H_i); dropout between layers, as nn.LSTM does
        return x, None


class RNNClassifier(nn.Module):
    """RNN over the sequence; the head reads the last step and the mean of all steps."""

    def __init__(self, cfg: RNNConfig):
        super().__init__()
        self.cfg = cfg
        rnn_cls = nn.LSTM if cfg.cell == "lstm" else nn.GRU
        if cfg.layer_hidden:
            self.rnn = RNNStack(rnn_cls, cfg.input_size, cfg.layer_hidden, cfg.dropout if cfg.layers > 1 else 0.0)
        else:
            self.rnn = rnn_cls(
                cfg.input_size, cfg.hidden, num_layers=cfg.layers, batch_first=True,
                dropout=cfg.dropout if cfg.layers > 1 else 0.0,
            )
        self.head = nn.Linear(2 * cfg.widths()[-1], cfg.num_classes)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(sequence)                         # (N, T, H)
        pooled = torch.cat([out[:, -1], out.mean(dim=1)], dim=-1)  # (N, 2H)
        return self.head(pooled)                            # (N, C)


@dataclass(frozen=True)
class LSTMConfig(RNNConfig):
    cell: str = "lstm"


@dataclass(frozen=True)
class GRUConfig(RNNConfig):
    cell: str = "gru"


for _cell, _cfg in (("lstm", LSTMConfig), ("gru", GRUConfig)):
    register_model(
        ModelSpec(
            name=_cell,
            family="sequence",
            config_cls=_cfg,
            build=RNNClassifier,
            inputs=(InputSpec("sequence", (8, 8), {0: "batch", 1: "seq_len"}),),
            input_fn=lambda cfg: (InputSpec("sequence", cfg.input_shape(), {0: "batch", 1: "seq_len"}),),
            data_fields=("seq_len", "input_size"),
            student={"hidden": 32},
            sizes={"base": {"hidden": 256, "layers": 2}},
            train_defaults={"epochs": 30, "lr": 1e-2},
        description=f"{_cell.upper()} classifier over N x T x F sequences (T dynamic)",
        )
    )
