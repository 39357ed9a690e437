"""The image side of Uni-Perceiver: InternImage stage-4 features turned into decoder tokens.

As in Uni-Perceiver v2, an image becomes a few global tokens (learned queries attention-pooling over
the last stage) followed by the flattened last-stage map, all projected to the decoder width.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from internimage import create_model
from internimage.checkpoint import load_checkpoint

from .decoder import Modality


@dataclass
class ImageEncoderConfig:
    """backbone: a registered InternImage variant; backbone_overrides: constructor overrides (e.g. a tiny
    width for CPU runs); checkpoint: an official or our own checkpoint to start from; allow_pickle: let that
    checkpoint be a `.pth` holding Python objects, whose unpickling could run code (trusted files only)."""
    backbone: str = "internimage_t"
    backbone_overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    allow_pickle: bool = False
    num_global_tokens: int = 4
    pool_heads: int = 4
    image_size: int = 224
    freeze_backbone: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AttentionPool(nn.Module):
    """Learned queries attending over the patch tokens (CLIP-style attention pooling).

    Written with its own Linear layers rather than nn.MultiheadAttention: that module reads its output
    projection's weight without calling it, which DeepSpeed ZeRO-3 (gathering a module's parameters when the
    module is called) leaves partitioned."""

    def __init__(self, width: int, num_queries: int, heads: int):
        super().__init__()
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor) -> Tensor:
        batch, length, width = tokens.shape
        queries = self.q_proj(self.queries.to(tokens.dtype)).expand(batch, -1, -1)
        heads, head_dim = self.heads, width // self.heads
        q = queries.reshape(batch, -1, heads, head_dim).transpose(1, 2)
        k, v = self.kv_proj(tokens).view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, width)
        return self.norm(self.out_proj(pooled))


class ImageEncoder(nn.Module):
    """images (B, 3, H, W) -> tokens (B, G + h*w, width) and their modality ids."""

    def __init__(self, config: ImageEncoderConfig, width: int):
        super().__init__()
        self.config = config
        self.backbone = create_model(config.backbone, features_only=True, **config.backbone_overrides)
        if config.checkpoint:
            load_checkpoint(self.backbone, config.checkpoint, allow_pickle=config.allow_pickle)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)
        channels = self.backbone.feature_info[-1]["num_chs"]
        self.proj = nn.Sequential(nn.Linear(channels, width), nn.LayerNorm(width))
        heads = config.pool_heads if width % config.pool_heads == 0 else 1
        self.pool = AttentionPool(width, config.num_global_tokens, heads) if config.num_global_tokens else None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        last_stage = self.backbone(images)[-1]                       # (B, C, h, w)
        patches = self.proj(last_stage.flatten(2).transpose(1, 2))   # (B, h*w, width)
        kinds = [torch.full(patches.shape[:2], int(Modality.IMAGE_PATCH), device=patches.device)]
        if self.pool is None:
            return patches, kinds[0]
        global_tokens = self.pool(patches)
        kinds.insert(0, torch.full(global_tokens.shape[:2], int(Modality.IMAGE_GLOBAL), device=patches.device))
        return torch.cat([global_tokens, patches], dim=1), torch.cat(kinds, dim=1)
