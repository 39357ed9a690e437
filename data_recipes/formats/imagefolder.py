"""Image classification from a folder per class (the ImageNet train layout): ROOT/<class>/<image>."""
from __future__ import annotations

from pathlib import Path

from ..samples import Sample
from .base import ImageDataset, LayoutError, read_json, require

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
NAME_FILES = ("classnames.txt", "class_names.txt", "classnames.json", "class_names.json")


def read_class_names(path: Path, folders: list[str]) -> list[str]:
    """Readable class names in folder order from a names file: a .txt with one name per line in class
    (sorted-folder) order, a JSON list in that order, a JSON {folder: name} mapping, or ImageNet's
    imagenet_class_index.json ({"0": [folder, name], ...})."""
    if path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict) and all(isinstance(v, list) and len(v) == 2 for v in data.values()):
            data = {folder: name for folder, name in data.values()}
        if isinstance(data, dict):
            missing = [f for f in folders if f not in data]
            if missing:
                raise ValueError(f"{path}: no name for class folder(s) {missing[:5]}")
            return [str(data[f]) for f in folders]
        names = [str(n) for n in data]
    else:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ValueError(f"{path}: {len(names)} class names for {len(folders)} class folders")
    return names


class ImageFolder(ImageDataset):
    """One sample per image file; `label` indexes the sorted class folders. `.class_names` are the readable
    names from `names=FILE` (or ROOT/classnames.txt|json when present), else the folder names."""

    format_name = "imagefolder"
    task_fields = ("label",)
    layout = "ROOT/<class folder>/<image>.jpg (one folder per class; optional names file, e.g. ROOT/classnames.txt)"

    def __init__(self, root: str, names: str | None = None, split: str | None = None):
        super().__init__()
        self.root = require(root, self.format_name, self.layout, kind="folder")
        if split:  # imagefolder:/data/imagenet?split=val reads /data/imagenet/val
            self.root = require(self.root / split, self.format_name, self.layout, kind="folder")
        self.split = split
        self.folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.folders:
            raise LayoutError(f"{self.root}: no class folders; the imagefolder layout expects {self.layout}")
        names_path = Path(names) if names else next(
            (self.root / n for n in NAME_FILES if (self.root / n).is_file()), None)
        if names and not names_path.is_file():
            raise LayoutError(f"{names_path}: no such file; expected a class-names file (.txt: one name per "
                              f"line in class-folder order, or .json)")
        self.class_names = read_class_names(names_path, self.folders) if names_path else list(self.folders)
        self.records = [(str(path), label) for label, folder in enumerate(self.folders)
                        for path in sorted((self.root / folder).rglob("*"))
                        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()]

    def _sample(self, record) -> Sample:
        path, label = record
        return Sample(image_id=str(Path(path).relative_to(self.root)), image_source=path, image_name=path,
                      split=self.split, label=label)
