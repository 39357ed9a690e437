"""An independent statement of the official InternImage, for tests: the T state-dict layout written out
from the release's key list, and a functional forward pass that reads a state_dict by those keys.

It shares no code with `internimage/` (only the DCNv3 reference operator), so a wiring mistake in the
model (a norm in the wrong place, a swapped Sequential index, a missing softmax) shows up as a mismatch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ops import dcnv3_core_reference

EPS = 1e-6


def internimage_t_keys() -> dict[str, tuple]:
    """The 633 entries of the official internimage_t_1k_224 state_dict, with shapes."""
    keys = {
        "patch_embed.conv1.weight": (32, 3, 3, 3), "patch_embed.conv1.bias": (32,),
        "patch_embed.norm1.1.weight": (32,), "patch_embed.norm1.1.bias": (32,),
        "patch_embed.conv2.weight": (64, 32, 3, 3), "patch_embed.conv2.bias": (64,),
        "patch_embed.norm2.1.weight": (64,), "patch_embed.norm2.1.bias": (64,),
    }
    for i, depth in enumerate((4, 4, 18, 4)):
        c, g = 64 * 2 ** i, 4 * 2 ** i
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            keys.update({
                p + "norm1.0.weight": (c,), p + "norm1.0.bias": (c,),
                p + "dcn.dw_conv.0.weight": (c, 1, 3, 3), p + "dcn.dw_conv.0.bias": (c,),
                p + "dcn.dw_conv.1.1.weight": (c,), p + "dcn.dw_conv.1.1.bias": (c,),
                p + "dcn.offset.weight": (g * 18, c), p + "dcn.offset.bias": (g * 18,),
                p + "dcn.mask.weight": (g * 9, c), p + "dcn.mask.bias": (g * 9,),
                p + "dcn.input_proj.weight": (c, c), p + "dcn.input_proj.bias": (c,),
                p + "dcn.output_proj.weight": (c, c), p + "dcn.output_proj.bias": (c,),
                p + "norm2.0.weight": (c,), p + "norm2.0.bias": (c,),
                p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,),
            })
        keys[f"levels.{i}.norm.0.weight"] = keys[f"levels.{i}.norm.0.bias"] = (c,)
        if i < 3:
            keys[f"levels.{i}.downsample.conv.weight"] = (2 * c, c, 3, 3)
            keys[f"levels.{i}.downsample.norm.1.weight"] = keys[f"levels.{i}.downsample.norm.1.bias"] = (2 * c,)
    keys["conv_head.0.weight"] = (768, 512, 1, 1)
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"conv_head.1.0.{name}"] = (768,)
    keys["conv_head.1.0.num_batches_tracked"] = ()
    keys["head.weight"], keys["head.bias"] = (1000, 768), (1000,)
    return keys


def _ln(sd, prefix, x):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], EPS)


def _linear(sd, prefix, x):
    return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))


def _dcn(sd, p, x, group, cfg):
    n, h, w, c = x.shape
    points = 9 - int(cfg.get("remove_center", False))
    value = _linear(sd, p + "input_proj", x)
    dw = sd[p + "dw_conv.0.weight"]
    guide = F.conv2d(x.permute(0, 3, 1, 2), dw, sd[p + "dw_conv.0.bias"], padding=(dw.shape[-1] - 1) // 2, groups=c)
    guide = F.gelu(_ln(sd, p + "dw_conv.1.1", guide.permute(0, 2, 3, 1)))
    offset = _linear(sd, p + "offset", guide)
    mask = F.softmax(_linear(sd, p + "mask", guide).reshape(n, h, w, group, points), -1).reshape(n, h, w, -1)
    out = dcnv3_core_reference(value, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, group, c // group,
                               cfg.get("offset_scale", 1.0), bool(cfg.get("remove_center", False)))
    if cfg.get("center_feature_scale"):
        scale = torch.sigmoid(F.linear(guide, sd[p + "center_feature_scale_proj_weight"],
                                       sd[p + "center_feature_scale_proj_bias"]))
        scale = scale[..., None].expand(n, h, w, group, c // group).reshape(n, h, w, c)
        out = out * (1 - scale) + value * scale
    return _linear(sd, p + "output_proj", out)


def _block(sd, p, x, group, cfg):
    dcn = lambda t: _dcn(sd, p + "dcn.", t, group, cfg)  # noqa: E731
    mlp = lambda t: _linear(sd, p + "mlp.fc2", F.gelu(_linear(sd, p + "mlp.fc1", t)))  # noqa: E731
    n1 = lambda t: _ln(sd, p + "norm1.0", t)  # noqa: E731
    n2 = lambda t: _ln(sd, p + "norm2.0", t)  # noqa: E731
    if cfg.get("layer_scale") is not None:
        g1, g2 = sd[p + "gamma1"], sd[p + "gamma2"]
        if cfg.get("post_norm"):
            x = x + g1 * n1(dcn(x))
            return x + g2 * n2(mlp(x))
        x = x + g1 * dcn(n1(x))
        return x + g2 * mlp(n2(x))
    if cfg.get("post_norm"):
        x = x + n1(dcn(x))
        return x + n2(mlp(x))
    if cfg.get("res_post_norm"):
        x = x + _ln(sd, p + "res_post_norm1.0", dcn(n1(x)))
        return x + _ln(sd, p + "res_post_norm2.0", mlp(n2(x)))
    x = x + dcn(n1(x))
    return x + mlp(n2(x))


def official_forward(sd: dict[str, torch.Tensor], cfg: dict, image: torch.Tensor, return_stages: bool = False):
    """Logits of the official classifier for `image` (NCHW), computed from its state_dict `sd`; with
    `return_stages`, the four stage maps (NCHW) that the release hands to dense tasks instead."""
    x = F.conv2d(image, sd["patch_embed.conv1.weight"], sd["patch_embed.conv1.bias"], stride=2, padding=1)
    x = F.gelu(_ln(sd, "patch_embed.norm1.1", x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    x = F.conv2d(x, sd["patch_embed.conv2.weight"], sd["patch_embed.conv2.bias"], stride=2, padding=1)
    x = _ln(sd, "patch_embed.norm2.1", x.permute(0, 2, 3, 1))
    post_ids = list(cfg.get("level2_post_norm_block_ids") or []) if cfg.get("level2_post_norm") else []
    stages = []
    for i, depth in enumerate(cfg["depths"]):
        for j in range(depth):
            x = _block(sd, f"levels.{i}.blocks.{j}.", x, cfg["groups"][i], cfg)
            if i == 2 and j in post_ids:
                x = _ln(sd, f"levels.2.post_norms.{post_ids.index(j)}.0", x)
        if not cfg.get("post_norm") or cfg.get("center_feature_scale"):
            x = _ln(sd, f"levels.{i}.norm.0", x)
        stages.append(x.permute(0, 3, 1, 2))
        if i < len(cfg["depths"]) - 1:
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[f"levels.{i}.downsample.conv.weight"], stride=2, padding=1)
            x = _ln(sd, f"levels.{i}.downsample.norm.1", x.permute(0, 2, 3, 1))
    if return_stages:
        return stages
    if cfg.get("use_clip_projector"):
        return _clip_head(sd, stages)
    y = F.conv2d(stages[-1], sd["conv_head.0.weight"])
    y = F.batch_norm(y, sd["conv_head.1.0.running_mean"], sd["conv_head.1.0.running_var"],
                     sd["conv_head.1.0.weight"], sd["conv_head.1.0.bias"], training=False, eps=1e-5)
    return _linear(sd, "head", F.gelu(y).mean(dim=(2, 3)))


def _clip_head(sd, stages, heads: int = 16):
    x4 = F.pixel_shuffle(F.conv2d(stages[-1], sd["dcnv3_head_x4.0.weight"], sd["dcnv3_head_x4.0.bias"]), 2)
    x3 = F.conv2d(stages[-2], sd["dcnv3_head_x3.weight"], sd["dcnv3_head_x3.bias"])
    tokens = (x4 + x3).flatten(2).transpose(1, 2)
    n, length, dim = tokens.shape
    query = _ln(sd, "clip_projector.norm1_q.0", tokens.mean(1, keepdim=True))
    key = _ln(sd, "clip_projector.norm1_k.0", tokens)
    value = _ln(sd, "clip_projector.norm1_v.0", tokens)
    a = "clip_projector.cross_dcn."
    q = F.linear(query, sd[a + "q.weight"], sd[a + "q_bias"]).reshape(n, 1, heads, -1).transpose(1, 2)
    k = F.linear(key, sd[a + "k.weight"], sd[a + "k_bias"]).reshape(n, length, heads, -1).transpose(1, 2)
    v = F.linear(value, sd[a + "v.weight"], sd[a + "v_bias"]).reshape(n, length, heads, -1).transpose(1, 2)
    attn = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    pooled = _linear(sd, a + "proj", (attn @ v).transpose(1, 2).reshape(n, 1, dim)).squeeze(1)
    return _linear(sd, "head", _ln(sd, "fc_norm.0", pooled))
