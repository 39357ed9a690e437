"""Loads official InternImage checkpoints (.pth or .safetensors) into our model, with errors that say
exactly which keys do not fit."""
from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .model import HEAD_MODULES

log = logging.getLogger(__name__)
WRAPPER_KEYS = ("model", "state_dict", "module")
# Prefixes that training frameworks or the release's Hugging Face conversion add to every key.
KEY_PREFIXES = ("module.", "model.", "backbone.")
HF_RENAMES = {".layer_scale1": ".gamma1", ".layer_scale2": ".gamma2"}


class CheckpointError(ValueError):
    """A file that is not a checkpoint of this model: the message lists what does not fit."""


@dataclass
class LoadReport:
    """What happened to each key: loaded, left at initialisation (missing gamma) or ignored (head weights
    when the model has no head)."""
    loaded: list[str] = field(default_factory=list)
    kept_initialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from "model"/"state_dict"/"module" and without key
    prefixes such as "module.".

    A `.pth` that holds Python objects besides tensors (a pickled config, say) is refused unless
    `allow_pickle=True`: unpickling it could run arbitrary code, so only do that for files you trust."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({error})") from error
    else:
        state = _torch_load(path, allow_pickle)
    state = _unwrap(state, path)
    return _strip_prefixes(state)


def _torch_load(path: Path, allow_pickle: bool = False):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise CheckpointError(f"checkpoint {path}: not a PyTorch checkpoint ({_first_line(error)})") from error
        if not allow_pickle:
            raise CheckpointError(_pickle_refusal(path, error)) from error
        # Training checkpoints of the release also pickle their config object; the tensors are what we want.
        warnings.warn(f"checkpoint {path} holds Python objects besides tensors; loading it with full unpickling "
                      "(allow_pickle=True). Only load checkpoints you trust.", stacklevel=3)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as inner:  # anything a corrupt pickle can raise
            raise CheckpointError(f"checkpoint {path}: not a PyTorch checkpoint ({_first_line(inner)})") from inner
    except Exception as error:  # torch.load raises many types on a file that is not a checkpoint
        raise CheckpointError(f"checkpoint {path}: not a PyTorch checkpoint ({_first_line(error)})") from error


def _pickle_refusal(path: Path, error: Exception) -> str:
    """Why a file that needs full unpickling was not loaded, and how to load it anyway: unpickling runs
    whatever code the file names, so it must be the caller's explicit choice."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    what = f" (such as {found.group(1)})" if found else ""
    return (f"checkpoint {path} holds Python objects besides tensors{what}, so reading it needs full unpickling, "
            "which could run arbitrary code. If you trust the file, pass allow_pickle=True (on the command line: "
            "--allow-pickle); better, re-save its tensors as .safetensors.")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, dict) and not _is_state_dict(state):
        wrapper = next((key for key in WRAPPER_KEYS if key in state), None)
        if wrapper is None:
            raise CheckpointError(f"checkpoint {path}: expected a state_dict of tensors or a dict holding one under "
                                  f"{' / '.join(repr(k) for k in WRAPPER_KEYS)}; found keys {sorted(state)[:10]}")
        state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"checkpoint {path}: expected a state_dict of tensors, found {type(state).__name__}")
    return state


def _is_state_dict(state: dict) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in KEY_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    renamed = {}
    for key, value in state.items():
        for old, new in HF_RENAMES.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def _is_head_key(key: str) -> bool:
    return key.split(".", 1)[0] in HEAD_MODULES


def _is_layer_scale_key(key: str) -> bool:
    return key.endswith((".gamma1", ".gamma2"))


def _describe(keys: list[str], shapes: dict[str, tuple], limit: int = 20) -> str:
    lines = [f"    {key} {list(shapes[key])}" for key in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"    ... and {len(keys) - limit} more")
    return "\n".join(lines)


def check_compatible(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> LoadReport:
    """Compares a state_dict with the model; raises CheckpointError listing missing, unexpected and
    mismatched keys with their shapes. Missing layer-scale gammas (classification weights in a backbone
    built with layer_scale for dense tasks) and head weights for a headless model are reported, not fatal."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    report = LoadReport()
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and expected[k] != found[k]]
    report.kept_initialised = [k for k in missing if _is_layer_scale_key(k)]
    headless = not any(_is_head_key(k) for k in expected)
    report.ignored = [k for k in unexpected if headless and _is_head_key(k)]
    missing = [k for k in missing if k not in report.kept_initialised]
    unexpected = [k for k in unexpected if k not in report.ignored]
    if missing or unexpected or mismatched:
        parts = [f"{source} does not fit {type(model).__name__} "
                 f"({len(found)} tensors in the file, {len(expected)} in the model)."]
        if missing:
            parts.append(f"  missing from the file ({len(missing)}), with the model's shapes:\n" + _describe(missing, expected))
        if unexpected:
            parts.append(f"  unexpected in the file ({len(unexpected)}), with the file's shapes:\n" + _describe(unexpected, found))
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}):\n" + "\n".join(
                f"    {k}: file {list(found[k])}, model {list(expected[k])}" for k in mismatched[:20]))
        parts.append("  Is it a checkpoint of another variant (create_model(name) must match the file), or "
                     "does num_classes differ?")
        raise CheckpointError("\n".join(parts))
    report.loaded = [k for k in expected if k in found]
    return report


def load_checkpoint(model: nn.Module, path: str | os.PathLike, assign: bool = False,
                    allow_pickle: bool = False) -> LoadReport:
    """Loads an official (or our own) checkpoint into `model`. `assign=True` keeps the file's tensors
    instead of copying them, which is how a model built on the meta device gets real weights.
    `allow_pickle=True` also reads a `.pth` holding Python objects (see `read_state_dict`): trusted files only."""
    state = read_state_dict(path, allow_pickle=allow_pickle)
    report = check_compatible(model, state, source=f"checkpoint {path}")
    if report.kept_initialised:
        warnings.warn(f"checkpoint {path} has no layer-scale weights for {len(report.kept_initialised)} keys "
                      f"({report.kept_initialised[0]}, ...): they keep their initial value (layer_scale). This is "
                      "expected when loading classification weights into a backbone built with layer_scale.",
                      stacklevel=2)
    if report.ignored:
        log.info("checkpoint %s: ignored %d head tensors (the model has no head)", path, len(report.ignored))
    state = {key: value for key, value in state.items() if key in report.loaded}
    if assign and report.kept_initialised:
        raise CheckpointError(f"checkpoint {path}: cannot load onto the meta device with missing keys "
                              f"{report.kept_initialised[:3]}; build the model on a real device")
    model.load_state_dict(state, strict=not report.kept_initialised, assign=assign)
    return report
