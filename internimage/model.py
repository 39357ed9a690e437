"""InternImage: a hierarchical backbone of DCNv3 blocks, checkpoint-compatible with the official release.

Inside the stages every tensor is channels-last (N, H, W, C), as in the release; the public outputs
(`forward_features`, `forward_stages`) are NCHW, as in timm.
"""
from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dcnv3 import DCNv3
from .layers import AttentionPoolingBlock, DownsampleLayer, MLPLayer, StemLayer, activation, norm_block

CLIP_EMBED_DIM = 1024  # width of the H/G attention-pooling head, fixed in the release
CLIP_OUT_DIM = 768
CLIP_NUM_HEADS = 16
HEAD_MODULES = ("conv_head", "head", "dcnv3_head_x4", "dcnv3_head_x3", "clip_projector", "fc_norm")


class InternImageLayer(nn.Module):
    """One block: DCNv3 token mixing and an MLP, each with a residual; the norm placement depends on the
    variant (pre-norm for T, post-norm for S..XL and G, residual post-norm for H)."""

    def __init__(self, channels: int, groups: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: str = "GELU", norm_layer: str = "LN", post_norm: bool = False,
                 layer_scale: float | None = None, offset_scale: float = 1.0, with_cp: bool = False,
                 dw_kernel_size: int | None = None, res_post_norm: bool = False,
                 center_feature_scale: bool = False, remove_center: bool = False, core_op: str = "DCNv3",
                 dcn_backend: str = "auto"):
        super().__init__()
        self.post_norm, self.res_post_norm, self.with_cp = post_norm, res_post_norm, with_cp
        self.layer_scale = layer_scale is not None
        self.norm1 = norm_block(channels, "LN")
        self.dcn = DCNv3(channels, kernel_size=3, dw_kernel_size=dw_kernel_size, stride=1, pad=1, dilation=1,
                         group=groups, offset_scale=offset_scale, act_layer=act_layer, norm_layer=norm_layer,
                         center_feature_scale=center_feature_scale, remove_center=remove_center,
                         core_op=core_op, dcn_backend=dcn_backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_block(channels, "LN")
        self.mlp = MLPLayer(channels, int(channels * mlp_ratio), act_layer, drop)
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(channels))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(channels))
        if res_post_norm:
            self.res_post_norm1 = norm_block(channels, "LN")
            self.res_post_norm2 = norm_block(channels, "LN")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # The precedence of the variants is the release's: layer scale ignores res_post_norm.
        if self.layer_scale:
            if self.post_norm:
                x = x + self.drop_path(self.gamma1 * self.norm1(self.dcn(x)))
                return x + self.drop_path(self.gamma2 * self.norm2(self.mlp(x)))
            x = x + self.drop_path(self.gamma1 * self.dcn(self.norm1(x)))
            return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        if self.post_norm:
            x = x + self.drop_path(self.norm1(self.dcn(x)))
            return x + self.drop_path(self.norm2(self.mlp(x)))
        if self.res_post_norm:
            x = x + self.drop_path(self.res_post_norm1(self.dcn(self.norm1(x))))
            return x + self.drop_path(self.res_post_norm2(self.mlp(self.norm2(x))))
        x = x + self.drop_path(self.dcn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class InternImageBlock(nn.Module):
    """One stage: its blocks, the optional level-2 post norms, the optional stage norm and the downsample.
    (Named "Block" in the release; it is what the state_dict calls `levels.i`.)"""

    def __init__(self, channels: int, depth: int, groups: int, downsample: bool = True,
                 drop_path: Sequence[float] | float = 0.0, post_norm: bool = False,
                 post_norm_block_ids: Sequence[int] | None = None, center_feature_scale: bool = False,
                 norm_layer: str = "LN", **layer_kwargs):
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList([
            InternImageLayer(channels, groups, drop_path=rates[i], post_norm=post_norm, norm_layer=norm_layer,
                             center_feature_scale=center_feature_scale, **layer_kwargs)
            for i in range(depth)])
        self.has_norm = (not post_norm) or center_feature_scale
        if self.has_norm:
            self.norm = norm_block(channels, "LN")
        self.post_norm_block_ids = list(post_norm_block_ids) if post_norm_block_ids else []
        if self.post_norm_block_ids:
            self.post_norms = nn.ModuleList([norm_block(channels, "LN") for _ in self.post_norm_block_ids])
        self.downsample = DownsampleLayer(channels, norm_layer) if downsample else None

    def forward(self, x: torch.Tensor, return_wo_downsample: bool = False):
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.post_norm_block_ids:
                x = self.post_norms[self.post_norm_block_ids.index(i)](x)
        if self.has_norm:
            x = self.norm(x)
        features = x
        if self.downsample is not None:
            x = self.downsample(x)
        return (features, x) if return_wo_downsample else x


class InternImage(nn.Module):
    """The InternImage backbone and classifier, with the official constructor's arguments.

    Extra arguments: `dcn_backend` picks the DCNv3 operator's backend ('auto', 'reference', 'cpu', 'cuda');
    `features_only=True` builds no head and makes `forward` return the four stage maps (NCHW, strides
    4, 8, 16, 32) for dense tasks and the Uni-Perceiver image encoder.
    """

    def __init__(self, core_op: str = "DCNv3", channels: int = 64, depths: Sequence[int] = (3, 4, 18, 5),
                 groups: Sequence[int] = (3, 6, 12, 24), num_classes: int = 1000, mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.2, drop_path_type: str = "linear",
                 act_layer: str = "GELU", norm_layer: str = "LN", layer_scale: float | None = None,
                 offset_scale: float = 1.0, post_norm: bool = False, cls_scale: float = 1.5, with_cp: bool = False,
                 dw_kernel_size: int | None = None, use_clip_projector: bool = False,
                 level2_post_norm: bool = False, level2_post_norm_block_ids: Sequence[int] | None = None,
                 res_post_norm: bool = False, center_feature_scale: bool = False, remove_center: bool = False,
                 dcn_backend: str = "auto", in_chans: int = 3, features_only: bool = False):
        super().__init__()
        if len(depths) != len(groups):
            raise ValueError(f"InternImage: depths {tuple(depths)} and groups {tuple(groups)} must have one entry per stage")
        if drop_path_type not in ("linear", "uniform"):
            raise ValueError(f"InternImage: drop_path_type must be 'linear' or 'uniform', got {drop_path_type!r}")
        for i, g in enumerate(groups):
            if (channels * 2 ** i) % g:
                raise ValueError(f"InternImage: stage {i} has {channels * 2 ** i} channels, not divisible by groups[{i}]={g}")
        self.num_classes = 0 if features_only else num_classes
        self.num_levels = len(depths)
        self.depths, self.channels = list(depths), channels
        self.num_features = int(channels * 2 ** (self.num_levels - 1))
        self.use_clip_projector, self.features_only = use_clip_projector, features_only
        self.grad_checkpointing = with_cp

        self.patch_embed = StemLayer(in_chans, channels, act_layer, norm_layer)
        self.pos_drop = nn.Dropout(drop_rate)
        if drop_path_type == "uniform":
            rates = [drop_path_rate] * sum(depths)
        else:
            rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.levels = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.levels.append(InternImageBlock(
                channels * 2 ** i, depth, groups[i], downsample=i < self.num_levels - 1,
                drop_path=rates[start:start + depth], post_norm=post_norm,
                post_norm_block_ids=level2_post_norm_block_ids if level2_post_norm and i == 2 else None,
                center_feature_scale=center_feature_scale, norm_layer=norm_layer, mlp_ratio=mlp_ratio,
                drop=drop_rate, act_layer=act_layer, layer_scale=layer_scale, offset_scale=offset_scale,
                with_cp=with_cp, dw_kernel_size=dw_kernel_size, res_post_norm=res_post_norm,
                remove_center=remove_center, core_op=core_op, dcn_backend=dcn_backend))
        self.feature_info = [dict(num_chs=channels * 2 ** i, reduction=4 * 2 ** i, module=f"levels.{i}")
                             for i in range(self.num_levels)]

        if not features_only:
            if use_clip_projector:
                self.dcnv3_head_x4 = nn.Sequential(
                    nn.Conv2d(self.num_features, CLIP_EMBED_DIM * 4, kernel_size=1), nn.PixelShuffle(2))
                self.dcnv3_head_x3 = nn.Conv2d(self.num_features // 2, CLIP_EMBED_DIM, kernel_size=1)
                self.clip_projector = AttentionPoolingBlock(CLIP_EMBED_DIM, CLIP_NUM_HEADS, CLIP_OUT_DIM)
                self.fc_norm = norm_block(CLIP_OUT_DIM, "LN")
                self.head_features = CLIP_OUT_DIM
            else:
                self.head_features = int(self.num_features * cls_scale)
                self.conv_head = nn.Sequential(
                    nn.Conv2d(self.num_features, self.head_features, kernel_size=1, bias=False),
                    norm_block(self.head_features, "BN", "channels_first", "channels_first"),
                    activation(act_layer))
            self.head = nn.Linear(self.head_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, DCNv3):
                module.reset_parameters()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (less memory, about a third more compute)."""
        self.grad_checkpointing = enable
        for level in self.levels:
            for block in level.blocks:
                block.with_cp = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage maps, NCHW at strides 4, 8, 16, 32: taken after each stage's norm, before its
        downsample (what the release hands to detection and segmentation)."""
        x = self.pos_drop(self.patch_embed(x))
        stages = []
        for level in self.levels:
            features, x = level(x, return_wo_downsample=True)
            stages.append(features.permute(0, 3, 1, 2))
        return stages

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features before the head, NCHW: the last stage map for T..XL; for H/G the fused
        stride-16 map of the third and (pixel-shuffled) fourth stages, 1024 channels."""
        if self.use_clip_projector and not self.features_only:
            stages = self.forward_stages(x)
            return self.dcnv3_head_x4(stages[-1]) + self.dcnv3_head_x3(stages[-2])
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            x = level(x)
        return x.permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling and classifier; `pre_logits=True` stops before the final linear layer."""
        if self.features_only:
            raise RuntimeError("InternImage: a features_only model has no head; use forward_stages()")
        if self.use_clip_projector:
            x = self.fc_norm(self.clip_projector(x.flatten(2).transpose(1, 2)))
        else:
            x = self.conv_head(x).mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_stages(x)
        return self.forward_head(self.forward_features(x))
