"""Real networks in plain torch for the bundled examples and the swap benchmarks.

Nothing here downloads anything; weights come from a seeded initialisation (see
`torpor.adapters.eager`, parameter `torpor.generate_weights`). Each network's forward runs its
top-level children in registration order, so the eager adapter's layer groups (one per
top-level child) are also the order in which execution needs them.

- `ResNet50`: the ResNet-50 v1.5 shape (bottleneck blocks [3, 4, 6, 3], 64..2048 channels,
  stride on the 3x3 convolution), 25,557,032 parameters. Input FP32 [N, 3, 224, 224] (NCHW),
  output logits FP32 [N, 1000]. State-dict keys follow torchvision's naming
  (`conv1.weight`, `layer1.0.conv1.weight`, `fc.bias`, ...), so torchvision weights load as they are.
- `BertEncoder`: the BERT-base encoder (12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522,
  512 positions, 2 token types), 109,482,240 parameters. `forward(input_ids, attention_mask=None,
  token_type_ids=None)` with INT64 [N, S] inputs returns `(last_hidden_state [N, S, 768],
  pooler_output [N, 768])`. Top-level children are `embeddings`, `layer0` .. `layer11`, `pooler`;
  inside them the names follow Hugging Face's `BertModel`, so its checkpoints load after renaming
  `encoder.layer.{i}.` to `layer{i}.`.
- `WideMLP(hidden, layers)`: `layers` square Linear layers with ReLU between them, input and output
  FP32 [N, hidden]; hidden * hidden * 4 bytes per layer (8192 x 4 layers is about 1.07 GB), for
  swap benchmarks where the weights, not the compute, dominate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BertEncoder", "ResNet50", "WideMLP"]


# --------------------------------------------------------------------------------------------
# ResNet-50
# --------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000, blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for i, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(count):
                stage.append(Bottleneck(in_channels, width, stride if j == 0 else 1))
                in_channels = width * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # A small scale on each block's last norm keeps activations bounded through 16 residual
        # additions with random weights (eval-mode BN with unit running stats does not normalise).
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return x


# --------------------------------------------------------------------------------------------
# BERT-base encoder
# --------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        seq = input_ids.shape[-1]
        positions = torch.arange(seq, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, s, self.heads, h // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=mask
        )
        return out.transpose(1, 2).reshape(n, s, h)


class BertDenseNorm(nn.Module):
    """dense -> add residual -> LayerNorm (HF's BertSelfOutput / BertOutput)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads)
        self.output = BertDenseNorm(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.attention = BertAttention(hidden, heads)
        self.intermediate = BertIntermediate(hidden, ffn)
        self.output = BertDenseNorm(ffn, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertPooler(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class BertEncoder(nn.Module):
    def __init__(
        self,
        vocab_size: int = 30522,
        hidden: int = 768,
        layers: int = 12,
        heads: int = 12,
        ffn: int = 3072,
        max_positions: int = 512,
        type_vocab_size: int = 2,
    ):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.num_layers = layers
        self.max_positions = max_positions
        self.embeddings = BertEmbeddings(vocab_size, hidden, max_positions, type_vocab_size)
        for i in range(layers):
            self.add_module(f"layer{i}", BertLayer(hidden, heads, ffn))
        self.pooler = BertPooler(hidden)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.dim() == 1:  # unbatched [S]
            input_ids = input_ids.unsqueeze(0)
            attention_mask = None if attention_mask is None else attention_mask.unsqueeze(0)
            token_type_ids = None if token_type_ids is None else token_type_ids.unsqueeze(0)
            hidden, pooled = self.forward(input_ids, attention_mask, token_type_ids)
            return hidden[0], pooled[0]
        if input_ids.shape[-1] > self.max_positions:
            raise ValueError(
                f"sequence length {input_ids.shape[-1]} exceeds the maximum of {self.max_positions}"
            )
        x = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None:
            # [N, S] of 1 (attend) / 0 (padding) -> additive [N, 1, 1, S]
            keep = attention_mask.to(torch.bool)[:, None, None, :]
            mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
            mask.masked_fill_(~keep, torch.finfo(x.dtype).min)
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i}")(x, mask)
        return x, self.pooler(x)


# --------------------------------------------------------------------------------------------
# Wide MLP (swap benchmarks)
# --------------------------------------------------------------------------------------------


class WideMLP(nn.Module):
    def __init__(self, hidden: int = 4096, layers: int = 4):
        super().__init__()
        if layers < 1:
            raise ValueError("WideMLP needs at least one layer")
        self.hidden = hidden
        self.num_layers = layers
        # Variance-1/hidden weights keep activations of the same order through the stack; the
        # layers are allocated without nn.Linear's own initialisation (one pass over ~GBs, not two).
        bound = math.sqrt(3.0 / hidden)
        device = torch.get_default_device()  # meta while the eager adapter builds a skeleton
        for i in range(layers):
            fc = nn.utils.skip_init(nn.Linear, hidden, hidden, device=device)
            nn.init.uniform_(fc.weight, -bound, bound)
            nn.init.zeros_(fc.bias)
            self.add_module(f"fc{i}", fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
            if i + 1 < self.num_layers:
                x = F.relu(x)
        return x
