"""COCO object detection: ROOT/annotations/instances_{split}2017.json and the images in ROOT/{split}2017/."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..samples import Sample
from .base import ImageDataset, as_bool, find_first, read_json, require


class CocoInstances(ImageDataset):
    """One sample per image: `boxes` ([x, y, w, h] pixels), `category_ids`, `categories` (names) and `iscrowd`,
    one entry per annotation, plus the `width`/`height` the JSON declares. `.categories` maps id -> name and
    `.class_names` lists the names in id order. `skip_empty=1` drops images without annotations."""

    format_name = "coco_instances"
    task_fields = ("boxes", "categories")
    layout = "ROOT/annotations/instances_{split}2017.json and the images in ROOT/{split}2017/"

    def __init__(self, root: str, split: str = "val", year: str = "2017", annotations: str | None = None,
                 images: str | None = None, skip_empty: str | bool = False):
        super().__init__()
        self.root, self.split = Path(root), split
        name = f"instances_{split}{year}.json"
        candidates = [Path(annotations)] if annotations else [self.root / "annotations" / name, self.root / name]
        self.annotation_path = find_first(candidates, self.format_name, self.layout)
        self.image_dir = Path(images) if images else self.root / f"{split}{year}"
        require(self.image_dir, self.format_name, self.layout, kind="folder")
        data = read_json(self.annotation_path)
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{self.annotation_path}: expected a list under {key!r} (COCO instances schema)")
        self.categories = {c["id"]: c["name"] for c in data["categories"]}
        self.class_names = [self.categories[i] for i in sorted(self.categories)]
        by_image = defaultdict(list)
        for annotation in data["annotations"]:
            by_image[annotation["image_id"]].append(annotation)
        self.records = [(image, by_image.get(image["id"], [])) for image in data["images"]
                        if not as_bool(skip_empty) or by_image.get(image["id"])]

    def _sample(self, record) -> Sample:
        image, annotations = record
        path = self.image_dir / image["file_name"]
        return Sample(
            image_id=image["id"], image_source=str(path), image_name=str(path), split=self.split,
            boxes=[[float(v) for v in a["bbox"]] for a in annotations],
            category_ids=[a["category_id"] for a in annotations],
            categories=[self.categories.get(a["category_id"], str(a["category_id"])) for a in annotations],
            iscrowd=[int(a.get("iscrowd", 0)) for a in annotations],
            width=image.get("width"), height=image.get("height"))
