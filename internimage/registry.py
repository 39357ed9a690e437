"""The released InternImage variants as data, and `create_model` to build one by name.

Hyperparameters are those of the release's classification configs (drop-path rates of the 22K->1K
fine-tunes for L..G); the parameter counts in `PARAM_COUNTS` are the published ones.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .model import InternImage

_COMMON = dict(core_op="DCNv3", mlp_ratio=4.0, act_layer="GELU", norm_layer="LN", cls_scale=1.5)

VARIANTS: dict[str, dict[str, Any]] = {
    "internimage_t": dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), drop_path_rate=0.1,
                          layer_scale=None, offset_scale=1.0, post_norm=False),
    "internimage_s": dict(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), drop_path_rate=0.4,
                          layer_scale=1e-5, offset_scale=1.0, post_norm=True),
    "internimage_b": dict(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), drop_path_rate=0.5,
                          layer_scale=1e-5, offset_scale=1.0, post_norm=True),
    "internimage_l": dict(channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80), drop_path_rate=0.1,
                          layer_scale=1e-5, offset_scale=2.0, post_norm=True),
    "internimage_xl": dict(channels=192, depths=(5, 5, 24, 5), groups=(12, 24, 48, 96), drop_path_rate=0.2,
                           layer_scale=1e-5, offset_scale=2.0, post_norm=True),
    "internimage_h": dict(channels=320, depths=(6, 6, 32, 6), groups=(10, 20, 40, 80), drop_path_rate=0.2,
                          layer_scale=None, offset_scale=1.0, post_norm=False, dw_kernel_size=5,
                          res_post_norm=True, level2_post_norm=True, level2_post_norm_block_ids=(5, 11, 17, 23, 29),
                          center_feature_scale=True, use_clip_projector=True),
    "internimage_g": dict(channels=512, depths=(2, 2, 48, 4), groups=(16, 32, 64, 128), drop_path_rate=0.4,
                          layer_scale=None, offset_scale=1.0, post_norm=True, dw_kernel_size=5,
                          level2_post_norm=True, level2_post_norm_block_ids=tuple(range(5, 48, 6)),
                          center_feature_scale=True, use_clip_projector=True),
}

# Published parameter counts (millions) of the 1000-class models, and the release's state_dict sizes.
PARAM_COUNTS = {"internimage_t": 29.92, "internimage_s": 50.08, "internimage_b": 97.46, "internimage_l": 223.33,
                "internimage_xl": 334.82, "internimage_h": 1089.64, "internimage_g": 3076.37}
STATE_DICT_ENTRIES = {"internimage_t": 633, "internimage_s": 751, "internimage_b": 751, "internimage_l": 839,
                      "internimage_xl": 883, "internimage_h": 1357, "internimage_g": 1295}


def list_models() -> list[str]:
    return sorted(VARIANTS)


def model_config(name: str, **overrides) -> dict[str, Any]:
    """The full constructor arguments of a registered variant, with overrides applied."""
    if name not in VARIANTS:
        raise ValueError(f"unknown InternImage variant {name!r}; registered: {', '.join(list_models())}")
    return {**_COMMON, **VARIANTS[name], **overrides}


def create_model(name: str, pretrained: str | os.PathLike | None = None, allow_pickle: bool = False,
                 **overrides) -> InternImage:
    """Builds a registered variant; `pretrained` is a local checkpoint path (.pth or .safetensors), and
    `allow_pickle=True` lets it be a `.pth` holding Python objects (trusted files only: see `read_state_dict`).

    Under `with torch.device("meta"):` the model is built without allocating memory, for counting
    parameters or for loading H and G with `load_checkpoint(..., assign=True)`.
    """
    model = InternImage(**model_config(name, **overrides))
    if pretrained is not None:
        from .checkpoint import load_checkpoint
        load_checkpoint(model, pretrained, assign=model_is_on_meta(model), allow_pickle=allow_pickle)
    return model


def model_is_on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())
