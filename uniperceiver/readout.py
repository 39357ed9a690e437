"""Similarity readout: turns decoder outputs into unit embeddings and scores inputs against candidate
targets by cosine similarity times a learnable per-task-family scale (P(x, y) ~ exp(cos / tau))."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_FAMILIES = ("retrieval", "classification", "caption", "vqa", "detection")


class SimilarityReadout(nn.Module):
    """post-LN + Linear + L2 norm; one logit scale per task family, initialised to 1/0.07 and never
    above 100 (as in CLIP and Uni-Perceiver: larger scales make training unstable).

    Families share the embedding space but not the temperature, since their candidate sets (a batch of
    captions, 3k answers, a 30k vocabulary) call for different sharpness.
    """

    def __init__(self, width: int, embed_dim: int, families: tuple[str, ...] = DEFAULT_FAMILIES,
                 init_scale: float = 1 / 0.07, max_scale: float = 100.0):
        super().__init__()
        if not families:
            raise ValueError("SimilarityReadout needs at least one task family")
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)
        nn.init.zeros_(self.proj.bias)
        self.log_max_scale = math.log(max_scale)
        self.logit_scale = nn.ParameterDict(
            {family: nn.Parameter(torch.tensor(math.log(init_scale))) for family in families})

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.logit_scale.keys())

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., width) decoder outputs -> (..., embed_dim) unit-norm embeddings."""
        return F.normalize(self.proj(self.norm(hidden)), dim=-1)

    def scale(self, family: str) -> Tensor:
        """exp(log-scale) of a family, clamped at the maximum (the gradient stops there)."""
        if family not in self.logit_scale:
            raise KeyError(f"unknown task family {family!r}; this readout has {list(self.families)}")
        return self.logit_scale[family].clamp(max=self.log_max_scale).exp()

    def similarity(self, a: Tensor, b: Tensor, family: str) -> Tensor:
        """Scaled cosine logits between embeddings a (..., N, D) and candidates b (M, D) or (..., M, D)
        -> (..., N, M). Inputs are re-normalised, so raw projections work too."""
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return self.scale(family) * a @ b.transpose(-1, -2)
