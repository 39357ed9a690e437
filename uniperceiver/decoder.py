"""The shared Uni-Perceiver decoder g: one pre-LN transformer that encodes every task input and every
candidate target, with a key/value cache for step-by-step caption decoding.

Inputs are token features already projected to the decoder width (image tokens, text-encoder states,
<SPE> tokens); the decoder adds modality-type and position embeddings and runs the blocks under the
task's attention mask (see `masks.py`). There is no final LayerNorm: the similarity readout's post-LN
plays that role.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from .masks import CaptionLayout, causal_mask
from .moe import NUM_ATTRIBUTE_BITS, MoEFeedForward


class Modality(enum.IntEnum):
    """Modality-type of a token; selects its type embedding."""
    SPE = 0
    TEXT = 1
    IMAGE_GLOBAL = 2
    IMAGE_PATCH = 3
    REGION = 4


@dataclass
class DecoderConfig:
    """Sizes of the shared decoder. The defaults are the Uni-Perceiver v2 decoder (BERT-base width,
    6 layers); `moe_experts > 0` turns the FFNs of every `moe_every`-th layer (0, moe_every, ...) into
    attribute-routed MoE FFNs."""
    width: int = 768
    depth: int = 6
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale_init: float | None = 1e-3
    drop_path: float = 0.0
    max_positions: int = 512
    num_modalities: int = len(Modality)
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1
    attribute_bits: int = NUM_ATTRIBUTE_BITS

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"DecoderConfig: width={self.width} is not divisible by heads={self.heads}")
        if self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(f"DecoderConfig: moe_top_k={self.moe_top_k} must lie in [1, moe_experts="
                             f"{self.moe_experts}]")
        if self.moe_every < 1:
            raise ValueError(f"DecoderConfig: moe_every must be >= 1, got {self.moe_every}")

    def uses_moe(self, layer: int) -> bool:
        return self.moe_experts > 0 and layer % self.moe_every == 0


@dataclass
class KVCache:
    """Keys and values of every layer for the tokens decoded so far, and which of them are real.

    Immutable in use: `SharedDecoder.forward` returns a new cache and `reorder` returns a new cache, so a
    beam search keeps or drops a step simply by keeping or dropping the returned object.
    """
    keys: tuple[Tensor, ...]    # per layer (B, heads, T, head_dim)
    values: tuple[Tensor, ...]
    valid: Tensor               # (B, T) True for real tokens

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def reorder(self, indices: Tensor) -> "KVCache":
        """Selects (and repeats) batch rows: sample i of the result is sample indices[i] of this cache.
        Expand to beams with `torch.arange(B).repeat_interleave(beams)`; follow the surviving beams with
        their origin indices."""
        indices = torch.as_tensor(indices, device=self.valid.device)
        return KVCache(tuple(k.index_select(0, indices) for k in self.keys),
                       tuple(v.index_select(0, indices) for v in self.values),
                       self.valid.index_select(0, indices))


class DecoderOutput(NamedTuple):
    hidden_states: Tensor         # (B, L, width)
    cache: KVCache | None         # only with use_cache=True


class CaptionInputs(NamedTuple):
    """A teacher-forced captioning sequence [<SPE>, prefix, words, SPE queries] ready for the decoder."""
    tokens: Tensor
    modality_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    layout: CaptionLayout


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, L, width), mask (B, 1, L, T + L) boolean or None -> output and the keys/values of all
        T + L positions (past first)."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width)), (k, v)


class DecoderBlock(nn.Module):
    """Pre-LN block: x + drop_path(gamma1 * attn(LN(x))), then the same around the (MoE) MLP."""

    def __init__(self, config: DecoderConfig, drop_path: float, use_moe: bool):
        super().__init__()
        width, hidden = config.width, int(config.width * config.mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, config.heads)
        self.norm2 = nn.LayerNorm(width)
        if use_moe:
            self.mlp = MoEFeedForward(width, hidden, config.moe_experts, config.moe_top_k, config.attribute_bits)
        else:
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        scale = config.layer_scale_init
        self.gamma1 = nn.Parameter(torch.full((width,), scale)) if scale else None
        self.gamma2 = nn.Parameter(torch.full((width,), scale)) if scale else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None, attributes: Tensor | None = None,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        y, kv = self.attn(self.norm1(x), mask, past)
        x = x + self.drop_path(y if self.gamma1 is None else self.gamma1 * y)
        h = self.norm2(x)
        y = self.mlp(h, attributes) if isinstance(self.mlp, MoEFeedForward) else self.mlp(h)
        x = x + self.drop_path(y if self.gamma2 is None else self.gamma2 * y)
        return x, kv


class LearnedToken(nn.Module):
    """The learned <SPE> feature, read by calling the module so that DeepSpeed ZeRO-3 (which gathers a module's
    parameters when it is called) has it whole: the decoder's callers build sequences outside its forward."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width))

    def forward(self, batch: int, count: int = 1) -> Tensor:
        return self.weight.expand(batch, count, -1)


class SharedDecoder(nn.Module):
    """The decoder g shared by all tasks, inputs and targets alike."""

    def __init__(self, config: DecoderConfig | None = None):
        super().__init__()
        self.config = config = config or DecoderConfig()
        self.spe = LearnedToken(config.width)
        self.modality_embed = nn.Embedding(config.num_modalities, config.width)
        self.position_embed = nn.Embedding(config.max_positions, config.width)
        self.embed_norm = nn.LayerNorm(config.width)
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(DecoderBlock(config, rate, config.uses_moe(i)) for i, rate in enumerate(rates))
        self.apply(self._init_embeddings)
        for block in self.blocks:
            self._init_block(block, config)
        nn.init.trunc_normal_(self.spe.weight, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Exports written when <SPE> was a bare parameter hold it as `spe`, now `spe.weight`."""
        if prefix + "spe" in state_dict and prefix + "spe.weight" not in state_dict:
            state_dict[prefix + "spe.weight"] = state_dict.pop(prefix + "spe")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _init_embeddings(module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=0.02)

    @staticmethod
    def _init_block(block: "DecoderBlock", config: DecoderConfig) -> None:
        """Width-scaled initialisation, as open_clip's text transformer: std width^-0.5 into attention,
        (2 width)^-0.5 into the MLP, and width^-0.5 (2 depth)^-0.5 for the layers that write the residual.

        BERT's fixed std of 0.02 suits width 768; at width 64 it leaves every attention output ~60x smaller than
        the residual, so that all <SPE> outputs start nearly equal (cosine 0.9999) and a model trained from
        scratch stays stuck at uniform logits."""
        width = config.width
        residual_std = width ** -0.5 * (2 * config.depth) ** -0.5
        linears = [(block.attn.qkv, width ** -0.5), (block.attn.proj, residual_std)]
        if isinstance(block.mlp, MoEFeedForward):
            for experts, std in ((block.mlp.fc1, (2 * width) ** -0.5), (block.mlp.fc2, residual_std)):
                nn.init.normal_(experts.weight, std=std)
                nn.init.zeros_(experts.bias)
        else:
            linears += [(block.mlp[0], (2 * width) ** -0.5), (block.mlp[2], residual_std)]
        for linear, std in linears:
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    # ----------------------------------------------------------------------------------------- sequences
    def spe_tokens(self, batch: int, count: int = 1) -> tuple[Tensor, Tensor]:
        """`count` <SPE> tokens per sample: features (batch, count, width) and modality ids (batch, count)."""
        tokens = self.spe(batch, count)
        ids = torch.full((batch, count), int(Modality.SPE), dtype=torch.long, device=tokens.device)
        return tokens, ids

    def prepend_spe(self, tokens: Tensor, modality_ids: Tensor) -> tuple[Tensor, Tensor]:
        """[<SPE>, tokens...]: the <SPE> output is the representation of the whole sequence."""
        spe, spe_ids = self.spe_tokens(tokens.shape[0])
        return torch.cat([spe.to(tokens.dtype), tokens], 1), torch.cat([spe_ids, modality_ids.long()], 1)

    def append_spe_queries(self, tokens: Tensor, modality_ids: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """[tokens..., <SPE> x count]: the queries that predict words (captioning) or an answer (VQA)."""
        spe, spe_ids = self.spe_tokens(tokens.shape[0], count)
        return torch.cat([tokens, spe.to(tokens.dtype)], 1), torch.cat([modality_ids.long(), spe_ids], 1)

    def caption_inputs(self, prefix: Tensor, prefix_modality: Tensor, words: Tensor) -> CaptionInputs:
        """[<SPE>, prefix, words, one SPE query per word] with its positions and mask, for teacher-forced
        training: the outputs at `layout.queries` predict the words."""
        tokens, ids = self.prepend_spe(prefix, prefix_modality)
        text_ids = torch.full(words.shape[:2], int(Modality.TEXT), dtype=torch.long, device=words.device)
        tokens, ids = torch.cat([tokens, words], 1), torch.cat([ids, text_ids], 1)
        tokens, ids = self.append_spe_queries(tokens, ids, words.shape[1])
        layout = CaptionLayout(prefix.shape[1] + 1, words.shape[1])
        positions = layout.position_ids(words.device).expand(words.shape[0], -1)
        return CaptionInputs(tokens, ids, positions, layout.attention_mask(words.device), layout)

    # ------------------------------------------------------------------------------------------- forward
    def embed(self, tokens: Tensor, modality_ids: Tensor, position_ids: Tensor) -> Tensor:
        if int(position_ids.max()) >= self.config.max_positions:
            raise ValueError(f"position id {int(position_ids.max())} exceeds max_positions="
                             f"{self.config.max_positions} of the decoder")
        x = tokens + self.modality_embed(modality_ids) + self.position_embed(position_ids)
        return self.embed_norm(x)

    def forward(self, tokens: Tensor, modality_ids: Tensor, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, valid: Tensor | None = None,
                attributes: Tensor | None = None, cache: KVCache | None = None, use_cache: bool = False,
                commit: int | None = None) -> DecoderOutput:
        """Runs the decoder over L new tokens, after the T tokens in `cache` if one is given.

        tokens (B, L, width); modality_ids (B, L); position_ids (B, L), default T, T+1, ...;
        attention_mask (L, T + L) or (B, L, T + L) boolean, True = may attend. Without it, new tokens see
          each other bidirectionally when there is no cache, and causally after the cache when there is
          one (every cached token plus the new tokens up to themselves).
        valid (B, L): False marks padding among the new tokens (hidden as keys; kept as such in the cache).
        attributes (B, L) integer TokenAttribute codes, needed when the config has MoE layers.
        use_cache: return a cache holding the old tokens plus the first `commit` new ones (default all).
          At caption step j, feed [w_{j-1}, q_j] with commit=1: the word stays cached, the query does not.
        """
        batch, length = tokens.shape[:2]
        past = 0 if cache is None else cache.length
        if cache is not None and cache.batch_size != batch:
            raise ValueError(f"cache holds {cache.batch_size} samples but {batch} were given; reorder it first")
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=tokens.device).expand(batch, -1)
        mask = self._attention_mask(attention_mask, valid, cache, batch, length, tokens.device)
        x = self.embed(tokens, modality_ids.long(), position_ids.long())
        new_kv = []
        for layer, block in enumerate(self.blocks):
            layer_past = None if cache is None else (cache.keys[layer], cache.values[layer])
            x, kv = block(x, mask, attributes, layer_past)
            new_kv.append(kv)
        if not use_cache:
            return DecoderOutput(x, None)
        commit = length if commit is None else commit
        if not 0 <= commit <= length:
            raise ValueError(f"commit must lie in [0, {length}] (the number of new tokens), got {commit}")
        keep = past + commit
        new_valid = torch.ones(batch, length, dtype=torch.bool, device=tokens.device) if valid is None else valid
        old_valid = new_valid[:, :0] if cache is None else cache.valid
        return DecoderOutput(x, KVCache(tuple(k[:, :, :keep] for k, _ in new_kv),
                                        tuple(v[:, :, :keep] for _, v in new_kv),
                                        torch.cat([old_valid, new_valid.bool()], 1)[:, :keep]))

    @staticmethod
    def _attention_mask(mask: Tensor | None, valid: Tensor | None, cache: KVCache | None,
                        batch: int, length: int, device: torch.device) -> Tensor | None:
        """The (B, 1, L, T + L) boolean mask for scaled_dot_product_attention, or None for full attention."""
        past = 0 if cache is None else cache.length
        if mask is None and valid is None and cache is None:
            return None
        if mask is None:
            square = causal_mask(length, device) if cache is not None else torch.ones(
                length, length, dtype=torch.bool, device=device)
            mask = torch.cat([torch.ones(length, past, dtype=torch.bool, device=device), square], 1)
        if mask.shape[-2:] != (length, past + length) or mask.dim() not in (2, 3):
            raise ValueError(f"attention_mask must be ({length}, {past + length}) or (B, {length}, "
                             f"{past + length}) for {length} new tokens after {past} cached ones, "
                             f"got {tuple(mask.shape)}")
        mask = mask.to(device=device, dtype=torch.bool).expand(batch, length, past + length)
        keys_valid = [] if cache is None else [cache.valid]
        keys_valid.append(torch.ones(batch, length, dtype=torch.bool, device=device) if valid is None
                          else valid.bool())
        mask = mask & torch.cat(keys_valid, 1)[:, None, :]
        if valid is not None:  # a padded query sees only itself, so that no row is empty
            own = torch.zeros(length, past + length, dtype=torch.bool, device=device)
            own[:, past:] = torch.eye(length, dtype=torch.bool, device=device)
            mask = torch.where(~valid.bool()[:, :, None], own, mask)
        return mask[:, None]
