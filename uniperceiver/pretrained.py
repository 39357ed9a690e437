"""Where a saved model comes from and how its weights go in: a local folder or a Hugging Face hub id (through
`huggingface_hub`, offline mode respected), and a state dict assigned into a model built on the meta device, so that
loading holds about one copy of the weights in memory instead of a random initialisation plus the file's copy.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .text_encoder import _HUB_ID, hub_offline


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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, each read straight into its own new tensor, floating ones cast to `dtype`
    and moved to `device` one at a time. Written by hand because safetensors' loaders hand out views of a memory
    map at the file's offsets: touching them keeps the mapped file resident beside any copy (two copies at the
    peak), and their addresses are unaligned, where vectorised kernels round differently from the saved model."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            if not 2 <= header_size <= 100_000_000:
                raise ValueError(f"a header of {header_size} bytes")
            header = json.loads(file.read(header_size))
            header.pop("__metadata__", None)
            start = 8 + header_size
            state = {}
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                kind = SAFETENSORS_DTYPES.get(entry["dtype"])
                if kind is None:
                    raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, which this loader does not read")
                begin, end = entry["data_offsets"]
                tensor = torch.empty(end - begin, dtype=torch.uint8)
                file.seek(start + begin)
                if file.readinto(tensor.numpy()) != end - begin:
                    raise ValueError(f"the file ends inside tensor {name!r}")
                tensor = tensor.view(kind).reshape(entry["shape"])
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[name] = tensor.to(device)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:  # json's errors are ValueErrors
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    return state


def load_assigned(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Assigns `state`'s tensors to `model` (no copy into preallocated weights). Parameters tied under several
    names (a language model's input and output embeddings, saved once) are tied again afterwards. Returns
    (missing, unexpected) keys, as `load_state_dict` does."""
    tied: dict[int, list[str]] = defaultdict(list)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tied[id(parameter)].append(name)
    groups = [names for names in tied.values() if len(names) > 1]
    state = dict(state)
    for names in groups:  # a tied group is complete when any of its names was saved
        saved = next((name for name in names if name in state), None)
        if saved is not None:
            for name in names:
                state.setdefault(name, state[saved])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    for names in groups:
        shared = getattr(*_owner(model, names[0]))
        for name in names[1:]:
            setattr(*_owner(model, name), shared)
    return list(missing), list(unexpected)


def tensors_on_meta(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers that were never given values."""
    return [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, attribute = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), attribute
