"""The classic digits CNN: Conv 32 / pool / Conv 64 / pool / Conv 64 / Dense 64 / Dense 10."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .registry import InputSpec, ModelSpec, register_model


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1
    image_size: int = 28
    channels1: int = 32
    channels2: int = 64
    channels3: int = 64
    hidden: int = 64
    num_classes: int = 10
    dropout: float = 0.0

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 for three 3x3 convs and two pools, got {self.image_size}")
        for k in ("in_channels", "channels1", "channels2", "channels3", "hidden", "num_classes"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        s = cfg.image_size
        s = ((s - 2) // 2 - 2) // 2 - 2  # spatial size after conv/pool/conv/pool/conv
        self.features = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.channels1, 3), nn.ReLU(), nn.MaxPool2d(2),  # (N,32,13,13)
            nn.Conv2d(cfg.channels1, cfg.channels2, 3), nn.ReLU(), nn.MaxPool2d(2),   # (N,64,5,5)
            nn.Conv2d(cfg.channels2, cfg.channels3, 3), nn.ReLU(),                    # (N,64,3,3)
        )
        self.head = nn.Sequential(
            nn.Flatten(),                                  # (N, 576)
            nn.Linear(cfg.channels3 * s * s, cfg.hidden), nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),        # (N, 10) logits
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


SPEC = register_model(
    ModelSpec(
        name="cnn",
        family="image",
        config_cls=CNNConfig,
        build=CNN,
        inputs=(InputSpec("image", (1, 28, 28), {0: "batch"}),),
        input_fn=lambda cfg: (InputSpec("image", cfg.input_shape(), {0: "batch"}, layout="nchw"),),
        data_fields=("in_channels", "image_size", "image_size"),
        student={"channels1": 16, "channels2": 32, "channels3": 32, "hidden": 32},
        sizes={"base": {"channels1": 128, "channels2": 256, "channels3": 256, "hidden": 256}},
        train_defaults={"epochs": 15, "lr": 3e-3},
        # 3 seeds on digits: T=4/alpha=0.7 without mixup matched the scratch twin; with mixup the twin won
        distill_defaults={"temperature": 4.0, "alpha": 0.7, "mixup": 0.0},
        description="Conv32/pool/Conv64/pool/Conv64/Dense64/Dense10 on N x 1 x 28 x 28 images",
    )
)
