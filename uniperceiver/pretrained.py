"""Where a saved model comes from and how its weights go in: a local folder or a Hugging Face hub id (through
`huggingface_hub`, offline mode respected), and a state dict assigned into a model built on the meta device, so that
loading holds about one copy of the weights in memory instead of a random initialisation plus the file's copy.
"""
from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .text_encoder import _HUB_ID, hub_offline


ALIGNMENT = 64  # bytes: what PyTorch's CPU allocator gives every tensor


class ModelNotFoundError(FileNotFoundError):
    """A saved model cannot be found where the caller points: the message says where it looked."""


def resolve_model_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder as it is; otherwise a hub id ("org/name") fetched, or found in the local cache, by
    `huggingface_hub.snapshot_download` (only the cache when HF_HUB_OFFLINE is set)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path}: a file, not a saved model folder")
        return path
    name = str(name_or_path)
    if not _HUB_ID.match(name):
        raise ModelNotFoundError(f"{path}: no such folder (and not a hub id of the form 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline()
    cache = os.environ.get("HF_HUB_CACHE")  # read now, as HF_HUB_OFFLINE is (huggingface_hub reads it at import)
    try:
        return Path(snapshot_download(repo_id=name, local_files_only=offline, cache_dir=cache))
    except LocalEntryNotFoundError as error:
        reason = ("HF_HUB_OFFLINE is set and the hub id is not in the local cache" if offline
                  else "the hub could not be reached and the id is not in the local cache")
        raise ModelNotFoundError(f"{name!r}: no local folder of that name, and {reason} "
                                 f"({cache or 'the default hub cache'})") from error
    except (HfHubHTTPError, OSError) as error:
        raise ModelNotFoundError(f"{name!r}: no local folder of that name, and the hub did not give it "
                                 f"({type(error).__name__}: {error})") from error


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no initialisation) while buffers,
    small and often computed rather than saved (the caption vocabulary, rotary frequencies), are built for real."""
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        yield


def load_assigned(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None
                  ) -> tuple[list[str], list[str]]:
    """Assigns `state`'s tensors to `model` (no copy into preallocated weights), floating ones cast to `dtype`.
    Parameters tied under several names (a language model's input and output embeddings, saved once) are tied
    again afterwards. Returns (missing, unexpected) keys, as `load_state_dict` does."""
    state = dict(state)
    for key, value in state.items():  # one tensor at a time: the replaced one is freed before the next is made
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        if value.device.type == "cpu" and value.data_ptr() % ALIGNMENT:
            # safetensors' CPU tensors sit where the file's layout puts them; vectorised kernels round differently
            # on unaligned data, so an unaligned copy would not reproduce the saved model bit for bit
            value = value.clone()
        state[key] = value
    tied: dict[int, list[str]] = defaultdict(list)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tied[id(parameter)].append(name)
    groups = [names for names in tied.values() if len(names) > 1]
    for names in groups:  # a tied group is complete when any of its names was saved
        saved = next((name for name in names if name in state), None)
        if saved is not None:
            for name in names:
                state.setdefault(name, state[saved])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    for names in groups:
        owner, attribute = _owner(model, names[0])
        shared = getattr(owner, attribute)
        for name in names[1:]:
            setattr(*_owner(model, name), shared)
    return list(missing), list(unexpected)


def tensors_on_meta(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers that were never given values."""
    return [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, attribute = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), attribute
