"""Embeddings that depend only on the weights (the caption vocabulary's features and candidates, class, answer and
category embeddings), computed once and reused while the weights stay as they are.

A cached value is valid for one state of the model: the fingerprint of every parameter and buffer (its storage
and its in-place version counter) is taken at each lookup, so an optimizer step, `load_state_dict`, `.to()` or an
assignment of new weights empties the cache; so does `train()`/`eval()`. Nothing is cached while autograd records
(training needs the graph), and the cache is bounded (least recently used entries go first).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch
from torch import nn


def weights_fingerprint(module: nn.Module) -> int | None:
    """Changes whenever a parameter or buffer of `module` is replaced or modified in place; None for weights made
    under `torch.inference_mode()`, which keep no version counter (their values are then never cached)."""
    try:
        return hash(tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in
                          (*module.parameters(), *module.buffers())))
    except RuntimeError:
        return None


class WeightsCache:
    """A bounded map from keys to values computed from `module`'s current weights."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self.enabled = True
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._fingerprint: int | None = None

    def clear(self) -> None:
        self._entries.clear()
        self._fingerprint = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, module: nn.Module, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value for `key`, computed by `compute()` unless a value from the same weights is cached."""
        if not self.enabled or torch.is_grad_enabled():
            return compute()
        fingerprint = weights_fingerprint(module)
        if fingerprint is None:
            return compute()
        if fingerprint != self._fingerprint:
            self._entries.clear()
            self._fingerprint = fingerprint
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = compute()
        self._entries[key] = value
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value
