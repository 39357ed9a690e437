"""The image side of Uni-Perceiver: InternImage features turned into decoder tokens.

As in Uni-Perceiver v2, an image becomes a few global tokens (learned queries attention-pooling over
the patch tokens) followed by the flattened feature maps, all projected to the decoder width. By default the
patch tokens are the last stage's (stride 32); `token_stages` adds finer stages. At 64 pixels the last stage
is a 2x2 map, too coarse for questions about which shape lies where or how many there are: the tiny recipe
also takes the stride-16 stage (4x4), so that each small shape has tokens of its own.
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
    token_stages: tuple[int, ...] = (-1,)  # backbone stages whose maps become patch tokens (-1: the last)
    image_size: int = 224
    freeze_backbone: bool = False

    def __post_init__(self):
        self.token_stages = tuple(int(stage) for stage in self.token_stages)
        if not self.token_stages or len(set(self.token_stages)) != len(self.token_stages):
            raise ValueError(f"ImageEncoderConfig: token_stages {list(self.token_stages)}: expected distinct stage "
                             "indices, e.g. [-1] or [-2, -1]")

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
        stages = len(self.backbone.feature_info)
        bad = [stage for stage in config.token_stages if not -stages <= stage < stages]
        if bad:
            raise ValueError(f"ImageEncoderConfig.token_stages {list(config.token_stages)}: the backbone has "
                             f"{stages} stages, so each must lie in [-{stages}, {stages - 1}]")
        self.stages = [stage % stages for stage in config.token_stages]
        # `proj` projects the last listed stage (the only one by default, as in earlier exports); `finer_proj`
        # the others, in the order listed.
        project = lambda stage: nn.Sequential(nn.Linear(self.backbone.feature_info[stage]["num_chs"], width),  # noqa: E731
                                              nn.LayerNorm(width))
        self.proj = project(self.stages[-1])
        self.finer_proj = nn.ModuleList(project(stage) for stage in self.stages[:-1])
        heads = config.pool_heads if width % config.pool_heads == 0 else 1
        self.pool = AttentionPool(width, config.num_global_tokens, heads) if config.num_global_tokens else None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        tokens, kinds, _ = self.encode(images)
        return tokens, kinds

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Tokens and modality ids as `forward`, and the backbone's stage maps (what region proposals read)."""
        maps = self.backbone(images)                                 # per stage (B, C, h, w)
        projections = [*self.finer_proj, self.proj]
        patches = torch.cat([project(maps[stage].flatten(2).transpose(1, 2))  # (B, sum of h*w, width)
                             for project, stage in zip(projections, self.stages)], dim=1)
        kinds = [torch.full(patches.shape[:2], int(Modality.IMAGE_PATCH), device=patches.device)]
        if self.pool is None:
            return patches, kinds[0], maps
        global_tokens = self.pool(patches)
        kinds.insert(0, torch.full(global_tokens.shape[:2], int(Modality.IMAGE_GLOBAL), device=patches.device))
        return torch.cat([global_tokens, patches], dim=1), torch.cat(kinds, dim=1), maps
