"""Attribute-routed mixture-of-experts feed-forward (Uni-Perceiver-MoE, "conditional MoE").

Routing depends only on a token's attribute (a few bits: which modalities the task uses, what the token
is, which side of the task it is on), never on its features. So all tokens with one attribute take the
same experts with the same weights, and the mixture can be folded into one weight matrix per attribute
before the matmul: the cost of a dense FFN, identical in training and inference.

Each linear layer of the FFN is a mixture of linear experts sharing one gate decision (as in the
released code). For a linear layer, sum_k g_k (W_k x + b_k) = (sum_k g_k W_k) x + sum_k g_k b_k exactly,
which is why the merge is not an approximation.
"""
from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TokenAttribute(enum.IntFlag):
    """The bits of a token's routing attribute; a token's attribute is the OR of its flags.

    Task-level bits (the same for every token of a sequence):
      INPUT_IMAGE, INPUT_TEXT, INPUT_REGIONS: the task's input contains image tokens / text / region tokens
        (captioning and VQA set INPUT_IMAGE | INPUT_TEXT; detection sets INPUT_IMAGE | INPUT_REGIONS).
      TARGET_TEXT: the task's candidates are text (classification, captioning, i2t); clear for image targets.
    Token-level bits:
      TOKEN_VISUAL, TOKEN_TEXT: what this token is; <SPE> tokens and queries set neither.
      TARGET_SIDE: the token belongs to a candidate-target sequence, not to the task input.
      CAUSAL_TEXT: the token lies in a causally masked span (caption words and their SPE queries).
    """
    INPUT_IMAGE = 1 << 0
    INPUT_TEXT = 1 << 1
    INPUT_REGIONS = 1 << 2
    TARGET_TEXT = 1 << 3
    TOKEN_VISUAL = 1 << 4
    TOKEN_TEXT = 1 << 5
    TARGET_SIDE = 1 << 6
    CAUSAL_TEXT = 1 << 7


NUM_ATTRIBUTE_BITS = len(TokenAttribute)


def attribute_bits(codes: Tensor, num_bits: int = NUM_ATTRIBUTE_BITS) -> Tensor:
    """Integer attribute codes (...) -> their binary vectors (..., num_bits) as 0/1 floats."""
    if codes.is_floating_point():
        raise TypeError(f"attribute codes must be integers (OR of TokenAttribute flags), got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << num_bits):
        raise ValueError(f"attribute codes must lie in [0, {1 << num_bits}), "
                         f"got [{int(codes.min())}, {int(codes.max())}]")
    shifts = torch.arange(num_bits, device=codes.device)
    return ((codes[..., None].long() >> shifts) & 1).float()


class AttributeGate(nn.Module):
    """attribute bits -> Linear + LayerNorm -> Linear (no bias) -> softmax -> top-k, renormalised.

    Returns a dense (N, num_experts) gate matrix that is zero outside each row's top-k. The router runs in
    at least float32 so that bf16 training does not flip which experts are chosen.
    """

    def __init__(self, width: int, num_experts: int, top_k: int, num_bits: int = NUM_ATTRIBUTE_BITS):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}], got {top_k}")
        self.num_bits, self.top_k = num_bits, top_k
        self.tag_transform = nn.Sequential(nn.Linear(num_bits, width), nn.LayerNorm(width))
        self.router = nn.Linear(width, num_experts, bias=False)

    def forward(self, codes: Tensor) -> Tensor:
        dtype = torch.promote_types(self.router.weight.dtype, torch.float32)
        bits = attribute_bits(codes, self.num_bits).to(self.tag_transform[0].weight.dtype)
        tags = self.tag_transform(bits).to(dtype)
        probs = F.linear(tags, self.router.weight.to(dtype)).softmax(dim=-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, chosen, top)


class ExpertLinear(nn.Module):
    """A linear layer with one weight and bias per expert, applied as their gate-weighted sum."""

    def __init__(self, in_features: int, out_features: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, gates: Tensor) -> tuple[Tensor, Tensor]:
        """gates (U, E) -> one weight (U, out, in) and bias (U, out) per row of gates. A forward (not a plain
        method) so that DeepSpeed ZeRO-3 gathers the experts' weights when it runs."""
        gates = gates.to(self.weight.dtype)
        return torch.einsum("ue,eoi->uoi", gates, self.weight), gates @ self.bias


class MoEFeedForward(nn.Module):
    """GELU MLP whose two linear layers are attribute-routed mixtures of `num_experts` experts."""

    def __init__(self, width: int, hidden: int, num_experts: int = 8, top_k: int = 2,
                 num_bits: int = NUM_ATTRIBUTE_BITS):
        super().__init__()
        self.gate = AttributeGate(width, num_experts, top_k, num_bits)
        self.fc1 = ExpertLinear(width, hidden, num_experts)
        self.fc2 = ExpertLinear(hidden, width, num_experts)

    def forward(self, x: Tensor, attributes: Tensor) -> Tensor:
        """x (..., width), attributes (...) integer codes -> (..., width)."""
        if attributes is None:
            raise ValueError("an MoE feed-forward needs the tokens' attribute codes (see TokenAttribute)")
        if attributes.shape != x.shape[:-1]:
            raise ValueError(f"attributes must have shape {tuple(x.shape[:-1])}, got {tuple(attributes.shape)}")
        flat = x.reshape(-1, x.shape[-1])
        distinct, which = torch.unique(attributes.reshape(-1), return_inverse=True)
        gates = self.gate(distinct)
        w1, b1 = self.fc1(gates)
        w2, b2 = self.fc2(gates)
        # Group the tokens by attribute, one dense FFN per group, then put them back in place.
        order = torch.argsort(which, stable=True)
        groups = flat[order].split(torch.bincount(which, minlength=len(distinct)).tolist())
        outputs = [F.linear(F.gelu(F.linear(group, w1[u], b1[u])), w2[u], b2[u])
                   for u, group in enumerate(groups)]
        out = torch.cat(outputs)[torch.argsort(order)]
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        experts, hidden, width = self.fc1.weight.shape
        return f"width={width}, hidden={hidden}, experts={experts}, top_k={self.gate.top_k}"
