"""The DCNv3 module: predicts offsets and a softmaxed mask from the input and runs the DCNv3 operator.

Parameter names and initialisation follow the official module, so its weights load unchanged.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ops import BACKENDS, dcnv3_core

from .layers import activation, norm_block

CORE_OPS = ("DCNv3", "DCNv3_pytorch")


def core_op_backend(core_op: str, dcn_backend: str) -> str:
    """The operator backend for an official `core_op` name: 'DCNv3_pytorch' forces the reference."""
    if core_op not in CORE_OPS:
        raise ValueError(f"core_op must be one of {CORE_OPS}, got {core_op!r}")
    if dcn_backend not in BACKENDS:
        raise ValueError(f"dcn_backend must be one of {BACKENDS}, got {dcn_backend!r}")
    return "reference" if core_op == "DCNv3_pytorch" else dcn_backend


def softmax_over_points(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (small) axis. `Tensor.softmax` is slow when that axis holds only the 9
    points of a group (about 9 ns an element on the CPU, an eighth of an InternImage-T forward), so
    without autograd it runs as four vectorised elementwise passes, in place."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return logits.softmax(dim=-1)
    exp = (logits - logits.amax(dim=-1, keepdim=True)).exp_()
    return exp.div_(exp.sum(dim=-1, keepdim=True))


class DCNv3(nn.Module):
    """Deformable convolution v3 on NHWC features (stride 1, the only stride the official module supports:
    offsets are predicted at the input resolution)."""

    def __init__(self, channels: int = 64, kernel_size: int = 3, dw_kernel_size: int | None = None, stride: int = 1,
                 pad: int = 1, dilation: int = 1, group: int = 4, offset_scale: float = 1.0,
                 act_layer: str = "GELU", norm_layer: str = "LN", center_feature_scale: bool = False,
                 remove_center: bool = False, core_op: str = "DCNv3", dcn_backend: str = "auto"):
        super().__init__()
        if channels % group:
            raise ValueError(f"DCNv3: channels ({channels}) must be divisible by group ({group})")
        if remove_center and kernel_size % 2 == 0:
            raise ValueError(f"DCNv3: remove_center needs an odd kernel_size, got {kernel_size}")
        group_channels = channels // group
        if group_channels & (group_channels - 1):
            warnings.warn(f"DCNv3: channels per group ({group_channels}) is not a power of 2; the kernels are "
                          "fastest with 16, 32 or 64", stacklevel=2)
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.channels, self.kernel_size, self.stride, self.pad, self.dilation = channels, kernel_size, stride, pad, dilation
        self.group, self.group_channels, self.offset_scale = group, group_channels, offset_scale
        self.center_feature_scale, self.remove_center = center_feature_scale, int(remove_center)
        self.points = kernel_size * kernel_size - self.remove_center
        self.backend = core_op_backend(core_op, dcn_backend)

        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, stride=1, padding=(dw_kernel_size - 1) // 2, groups=channels),
            norm_block(channels, norm_layer, "channels_first", "channels_last"),
            activation(act_layer),
        )
        self.offset = nn.Linear(channels, group * self.points * 2)
        self.mask = nn.Linear(channels, group * self.points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets and mask start at zero (a regular kernel with uniform weights); projections are Xavier."""
        for layer in (self.offset, self.mask):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = input.shape
        value = self.input_proj(input)
        # Offsets and mask come from the raw input through the depthwise branch, not from the value.
        guide = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(guide)
        mask = softmax_over_points(self.mask(guide).reshape(n, h, w, self.group, self.points))
        mask = mask.reshape(n, h, w, self.group * self.points).to(value.dtype)
        k = self.kernel_size
        x = dcnv3_core(value, offset.to(value.dtype), mask, k, k, self.stride, self.stride, self.pad, self.pad,
                       self.dilation, self.dilation, self.group, self.group_channels, self.offset_scale,
                       remove_center=bool(self.remove_center), backend=self.backend)
        if self.center_feature_scale:
            scale = torch.sigmoid(nn.functional.linear(guide, self.center_feature_scale_proj_weight,
                                                       self.center_feature_scale_proj_bias))
            scale = scale.repeat_interleave(self.group_channels, dim=-1)
            x = x * (1 - scale) + value * scale
        return self.output_proj(x)
