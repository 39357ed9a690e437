"""One seeding scheme for every launcher: each random stream is named by a tuple of integers and drawn from
`np.random.SeedSequence`, so streams of different (seed, purpose, rank, epoch, index) never collide and need no
state of their own; `rng_state`/`set_rng_state` carry the global generators across a resume."""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch

# Purposes of the derived streams (the second entry of a key), so two uses of one seed never coincide.
WEIGHTS, RANK, DATA_ORDER, SAMPLE = 0, 1, 2, 3


def derive_seed(*key: int) -> int:
    """A 63-bit seed for the stream named by `key` (non-negative integers)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in key]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def epoch_permutation(seed: int, epoch: int, length: int) -> list[int]:
    """The order of `length` items in epoch `epoch` of the stream seeded `seed`, the same on every rank."""
    generator = torch.Generator().manual_seed(derive_seed(seed, DATA_ORDER, epoch))
    return torch.randperm(length, generator=generator).tolist()


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators (CPU and every GPU) from `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def local_seed(seed: int) -> Iterator[None]:
    """Seeds the global Python, NumPy and torch CPU generators (those torchvision and timm transforms draw
    from) for the block, then restores them: the caller's streams are untouched. Only the CPU generator is
    seeded, as only it is restored; `torch.manual_seed` would also queue a lazy seeding of the CUDA, XPU and
    MTIA generators, recording a stack trace each time (about 1 ms a picture, a third of a batch's loading)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def rng_state() -> dict[str, Any]:
    """The global generators' states as plain data and tensors, so `torch.load(weights_only=True)` reads them."""
    python = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [python[0], list(python[1]), python[2]],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
