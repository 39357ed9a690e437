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
        self.logit_scale = FamilyScales(families, math.log(init_scale), math.log(max_scale))

    @property
    def families(self) -> tuple[str, ...]:
        return self.logit_scale.families

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., width) decoder outputs -> (..., embed_dim) unit-norm embeddings."""
        return F.normalize(self.proj(self.norm(hidden)), dim=-1)

    def scale(self, family: str) -> Tensor:
        """exp(log-scale) of a family, clamped at the maximum (the gradient stops there)."""
        return self.logit_scale(family)

    def similarity(self, a: Tensor, b: Tensor, family: str) -> Tensor:
        """Scaled cosine logits between embeddings a (..., N, D) and candidates b (M, D) or (..., M, D)
        -> (..., N, M). Inputs are re-normalised, so raw projections work too."""
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return self.scale(family) * a @ b.transpose(-1, -2)


class FamilyScales(nn.Module):
    """One learnable log-scale per task family, read by calling the module (`scales("vqa")`), so that DeepSpeed
    ZeRO-3, which gathers a module's parameters when it is called, has them whole. `scales["vqa"]` is the raw
    parameter. Each is a one-element vector, not a 0-d tensor: ZeRO moves parameters as byte views, which 0-d
    tensors cannot give ("self.dim() cannot be 0 to view Float as Byte")."""

    def __init__(self, families: tuple[str, ...], init: float, maximum: float):
        super().__init__()
        self.families = tuple(families)
        self.log_max = maximum
        for family in self.families:
            self.register_parameter(family, nn.Parameter(torch.full((1,), init)))

    def __getitem__(self, family: str) -> nn.Parameter:
        if family not in self.families:
            raise KeyError(f"unknown task family {family!r}; this readout has {list(self.families)}")
        return getattr(self, family)

    def __contains__(self, family: str) -> bool:
        return family in self.families

    def forward(self, family: str) -> Tensor:
        return self[family].clamp(max=self.log_max).exp()[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Exports written when the scales were 0-d tensors: reshape them."""
        for family in self.families:
            key = prefix + family
            if key in state_dict and state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
