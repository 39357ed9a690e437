"""Loaders for the standard dataset formats, all returning `data_recipes.samples.Sample`, and one factory:

    open_dataset("coco_karpathy:/data/coco?split=test")
    open_dataset("vqav2:/data/vqa?split=val")
    open_dataset("coco_instances:/data/coco?split=val")
    open_dataset("imagefolder:/data/imagenet/val?names=/data/imagenet/classnames.txt")
    open_dataset("webdataset:/data/shards/shard-{000000..000003}.tar")
    open_dataset("hf:/data/my_ds?split=train&image=img&caption=text")
    open_dataset("shapes?split=val")                         # the built-in synthetic dataset (cached build)
    open_dataset("shapes:/tmp/shapes?train_size=100&task=vqa")  # ShapesConfig fields; one sample per question

SPEC is FORMAT[:PATH][?KEY=VALUE&...]; the options are the loader's keyword arguments.
"""
from __future__ import annotations

import importlib
import inspect
from urllib.parse import parse_qsl

from .base import ImageDataset, LayoutError, SkipBadImages, skip_bad_images

# format name -> "module:Class", imported on first use so optional packages (datasets, webdataset) stay optional
FORMATS = {
    "coco_karpathy": "coco_karpathy:CocoKarpathy",
    "flickr30k": "flickr30k:Flickr30k",
    "vqav2": "vqav2:VQAv2",
    "coco_instances": "coco_instances:CocoInstances",
    "imagefolder": "imagefolder:ImageFolder",
    "webdataset": "webdataset:WebDatasetShards",
    "hf": "hf:HFDataset",
    "shapes": "shapes:ShapesSamples",  # the built-in synthetic dataset; PATH (optional) is its build folder
}


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """'vqav2:/data/vqa?split=val' -> ('vqav2', '/data/vqa', {'split': 'val'})."""
    head, _, query = spec.partition("?")
    name, _, path = head.partition(":")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    return name.strip(), (path or None), options


def format_class(name: str) -> type:
    if name not in FORMATS:
        raise ValueError(f"unknown dataset format {name!r}; expected one of {sorted(FORMATS)} "
                         f"(SPEC is FORMAT:PATH?key=value&...)")
    module_name, class_name = FORMATS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)


def open_dataset(spec: str, skip_bad: bool = False, **overrides):
    """The dataset a SPEC names (see the module docstring); keyword `overrides` win over the spec's options.
    With `skip_bad=True` it comes wrapped in `SkipBadImages`."""
    name, path, options = parse_spec(spec)
    options.update(overrides)
    cls = format_class(name)
    if name == "shapes":  # the options are ShapesConfig fields; checked by the loader
        dataset = cls(path, **options)
    else:
        if path is None:
            raise ValueError(f"{spec!r}: the {name} format needs a path ({name}:PATH); it expects {cls.layout}")
        parameters = inspect.signature(cls.__init__).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        unknown = [k for k in options if k not in parameters or k in ("self", "root", "urls")]
        if unknown and not accepts_any:
            allowed = [k for k in parameters if k not in ("self", "root", "urls")]
            raise ValueError(f"{spec!r}: unknown option(s) {unknown} for {name}; it accepts {allowed}")
        dataset = cls(path, **options)
    return skip_bad_images(dataset) if skip_bad else dataset


__all__ = ["FORMATS", "ImageDataset", "LayoutError", "SkipBadImages", "format_class", "open_dataset",
           "parse_spec", "skip_bad_images"]
