"""Shared pieces of the tests that build the tiny UniPerceiver: the toy backbone and a short overfitting loop."""
from __future__ import annotations

import pytest
import torch

# A toy InternImage on the reference operator: no kernel build, fast at 64x64.
TINY_BACKBONE = dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0,
                     dcn_backend="reference")


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory):
    """The project cache (and so the built-in tiny text model) in a temporary folder, and no hub access."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERN25_CACHE_DIR", str(tmp_path_factory.mktemp("intern25-cache")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


def overfit(model, task, batch, steps: int = 40, lr: float = 3e-4) -> list[float]:
    """AdamW on one batch; returns the losses. Leaves the model in eval mode."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    losses = []
    for _ in range(steps):
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
