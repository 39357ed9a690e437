"""Building blocks of InternImage whose module nesting reproduces the official key names.

The official code wraps every norm in an `nn.Sequential` together with the permutes around it, so
`patch_embed.norm1.1.weight` or `levels.0.blocks.0.norm1.0.weight` name a LayerNorm by its index in
that Sequential. `norm_block` builds the same nesting so official state_dicts load unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

LAYER_NORM_EPS = 1e-6  # every LayerNorm of the release uses 1e-6, not PyTorch's 1e-5


class ToChannelsLast(nn.Module):
    """NCHW -> NHWC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    """NHWC -> NCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def norm_block(channels: int, norm_layer: str = "LN", in_format: str = "channels_last",
               out_format: str = "channels_last") -> nn.Sequential:
    """A norm wrapped with the permutes it needs, as an `nn.Sequential` (the official nesting).

    LayerNorm normalises the last axis, so it runs channels-last; BatchNorm2d runs channels-first.
    """
    for name, value in (("in_format", in_format), ("out_format", out_format)):
        if value not in ("channels_first", "channels_last"):
            raise ValueError(f"norm_block: {name} must be 'channels_first' or 'channels_last', got {value!r}")
    layers: list[nn.Module] = []
    if norm_layer == "LN":
        if in_format == "channels_first":
            layers.append(ToChannelsLast())
        layers.append(nn.LayerNorm(channels, eps=LAYER_NORM_EPS))
        if out_format == "channels_first":
            layers.append(ToChannelsFirst())
    elif norm_layer == "BN":
        if in_format == "channels_last":
            layers.append(ToChannelsFirst())
        layers.append(nn.BatchNorm2d(channels))
        if out_format == "channels_last":
            layers.append(ToChannelsLast())
    else:
        raise ValueError(f"norm_layer must be 'LN' or 'BN', got {norm_layer!r}")
    return nn.Sequential(*layers)


def activation(act_layer: str) -> nn.Module:
    """The activation named in a config: 'GELU' is the exact (erf) GELU of the release."""
    if act_layer == "GELU":
        return nn.GELU()
    if act_layer == "ReLU":
        return nn.ReLU(inplace=True)
    if act_layer == "SiLU":
        return nn.SiLU(inplace=True)
    raise ValueError(f"act_layer must be 'GELU', 'ReLU' or 'SiLU', got {act_layer!r}")


class StemLayer(nn.Module):
    """Two stride-2 3x3 convolutions: NCHW image -> NHWC features at stride 4."""

    def __init__(self, in_chans: int = 3, out_chans: int = 96, act_layer: str = "GELU", norm_layer: str = "BN"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = norm_block(out_chans // 2, norm_layer, "channels_first", "channels_first")
        self.act = activation(act_layer)
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, kernel_size=3, stride=2, padding=1)
        self.norm2 = norm_block(out_chans, norm_layer, "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class DownsampleLayer(nn.Module):
    """A stride-2 3x3 convolution (no bias) that doubles the channels; NHWC in and out."""

    def __init__(self, channels: int, norm_layer: str = "LN"):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = norm_block(2 * channels, norm_layer, "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))


class MLPLayer(nn.Module):
    """The block's feed-forward: fc1, activation, dropout, fc2, dropout."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: str = "GELU", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = activation(act_layer)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if isinstance(self.act, nn.GELU) and not (torch.is_grad_enabled() and hidden.requires_grad):
            # In place when nothing needs the pre-activation: saves allocating (and page-faulting) a
            # buffer the size of the widest activation of the network.
            hidden = torch.ops.aten.gelu_(hidden)
        else:
            hidden = self.act(hidden)
        return self.drop(self.fc2(self.drop(hidden)))


class CrossAttention(nn.Module):
    """Multi-head attention of a few queries over tokens; bias-free q/k/v with separate bias parameters
    (the release's layout, kept for its key names)."""

    def __init__(self, dim: int, num_heads: int = 8, out_dim: int | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, out_dim or dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor, linear: nn.Linear, bias: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return nn.functional.linear(x, linear.weight, bias).reshape(batch, tokens, self.num_heads, -1).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        q = self._heads(query, self.q, self.q_bias)
        k = self._heads(key, self.k, self.k_bias)
        v = self._heads(value, self.v, self.v_bias)
        x = nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        x = x.transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
        return self.proj_drop(self.proj(x))


class AttentionPoolingBlock(nn.Module):
    """Pools tokens into one vector: the mean token attends over all tokens (the H/G "clip projector")."""

    def __init__(self, dim: int, num_heads: int, out_dim: int, attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        self.norm1_q = norm_block(dim, "LN")
        self.norm1_k = norm_block(dim, "LN")
        self.norm1_v = norm_block(dim, "LN")
        self.cross_dcn = CrossAttention(dim, num_heads, out_dim, attn_drop, drop)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.norm1_q(tokens.mean(dim=1, keepdim=True))
        return self.cross_dcn(query, self.norm1_k(tokens), self.norm1_v(tokens)).squeeze(1)
