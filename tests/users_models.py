"""Models nobody on this project wrote, as a user brings them: factory functions (`file.py:function`).

Hugging Face models are built from tiny configs (nothing is downloaded) and wrapped so that forward takes
the inputs by name and returns the logits tensor; the torchvision-style ResNet is written here because
PyPI's torchvision does not import beside the CPU torch on these machines."""
from __future__ import annotations

import torch
from torch import nn

TOKENS = 64        # digits as tokens: 64 pixel intensities per image
VOCAB = 20         # covers the 17 intensities 0..16 (0 doubles as padding)


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()


class TokenClassifier(nn.Module):
    """A Hugging Face sequence classifier as a module of (input_ids, attention_mask) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _token_example(model: nn.Module) -> nn.Module:
    model.example_inputs = {"input_ids": torch.zeros(2, TOKENS, dtype=torch.int64),
                            "attention_mask": torch.ones(2, TOKENS, dtype=torch.int64)}
    axes = {0: "batch", 1: "seq_len"}
    model.dynamic_axes = {"input_ids": axes, "attention_mask": dict(axes)}
    return model


def bert(hidden_size: int = 32, layers: int = 2, heads: int = 4, intermediate_size: int = 64,
         vocab_size: int = VOCAB, num_classes: int = 10) -> nn.Module:
    _quiet()
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate_size,
                     max_position_embeddings=2 * TOKENS + 8, num_labels=num_classes)
    return _token_example(TokenClassifier(BertForSequenceClassification(cfg)))


def distilbert(dim: int = 32, layers: int = 2, heads: int = 4, hidden_dim: int = 64, vocab_size: int = VOCAB,
               num_classes: int = 10) -> nn.Module:
    _quiet()
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=vocab_size, dim=dim, n_layers=layers, n_heads=heads, hidden_dim=hidden_dim,
                           max_position_embeddings=2 * TOKENS + 8, num_labels=num_classes)
    return _token_example(TokenClassifier(DistilBertForSequenceClassification(cfg)))


def gpt2(n_embd: int = 32, layers: int = 2, heads: int = 4, vocab_size: int = VOCAB, num_classes: int = 10) -> nn.Module:
    _quiet()
    from transformers import GPT2Config, GPT2ForSequenceClassification

    # pad_token_id outside the data's ids (0..16): GPT-2 classifies from the last position of each row.
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=layers, n_head=heads, n_positions=2 * TOKENS + 8,
                     num_labels=num_classes, pad_token_id=vocab_size - 1)
    return _token_example(TokenClassifier(GPT2ForSequenceClassification(cfg)))


class ImageClassifier(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def vit(hidden_size: int = 32, layers: int = 2, heads: int = 4, intermediate_size: int = 64, image_size: int = 16,
        num_classes: int = 10) -> nn.Module:
    _quiet()
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=image_size, patch_size=4, num_channels=3, hidden_size=hidden_size,
                    num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate_size,
                    num_labels=num_classes)
    model = ImageClassifier(ViTForImageClassification(cfg))
    model.example_inputs = {"pixel_values": torch.zeros(2, 3, image_size, image_size)}
    return model


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv-bn-relu-conv-bn, plus the (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, image):                        # (N, 3, H, W)
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(image)))), 1))


def resnet(width: int = 8, num_classes: int = 10) -> nn.Module:
    model = ResNet(width, num_classes)
    model.example_inputs = {"image": torch.zeros(2, 3, 16, 16)}
    return model


def rgb_cnn(channels: int = 8, num_classes: int = 10) -> nn.Module:
    """A small channels-first RGB CNN; the test feeds it channels-last (N, H, W, 3) npz images."""
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(4 * channels, num_classes))
    model.example_inputs = {"image": torch.zeros(2, 3, 16, 16)}
    return model


class TwoInputs(nn.Module):
    """Rows of an image (N, T, F) and a per-sample feature vector (N, F), combined."""

    def __init__(self, hidden: int, num_classes: int):
        super().__init__()
        self.rows = nn.GRU(8, hidden, batch_first=True)
        self.aux = nn.Linear(8, hidden)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, rows, aux):
        out, _ = self.rows(rows)
        return self.head(torch.cat([out.mean(1), torch.relu(self.aux(aux))], dim=-1))


def two_inputs(hidden: int = 16, num_classes: int = 10) -> nn.Module:
    model = TwoInputs(hidden, num_classes)
    model.example_inputs = {"rows": torch.zeros(2, 8, 8), "aux": torch.zeros(2, 8)}
    model.dynamic_axes = {"rows": {0: "batch", 1: "seq_len"}, "aux": {0: "batch"}}
    return model


class TwoDenseInputs(nn.Module):
    """The same two inputs through dense layers only, concatenated: what Torch-Pruning's graph can prune."""

    def __init__(self, hidden: int, num_classes: int):
        super().__init__()
        self.rows = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.aux = nn.Linear(8, hidden)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, rows, aux):
        return self.head(torch.cat([self.rows(rows), torch.relu(self.aux(aux))], dim=-1))


def two_dense_inputs(hidden: int = 16, num_classes: int = 10) -> nn.Module:
    model = TwoDenseInputs(hidden, num_classes)
    model.example_inputs = {"rows": torch.zeros(2, 8, 8), "aux": torch.zeros(2, 8)}
    return model

