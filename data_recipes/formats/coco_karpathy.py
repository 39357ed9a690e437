"""COCO captions in the Karpathy split: ROOT/dataset_coco.json and the images in ROOT/train2014, ROOT/val2014."""
from __future__ import annotations

from pathlib import Path

from ..samples import Sample
from .base import ImageDataset, find_first, read_json

# Karpathy's "restval" images are val2014 images used for training.
SPLITS = {"train": ("train", "restval"), "restval": ("restval",), "val": ("val",), "test": ("test",),
          "all": ("train", "restval", "val", "test")}


class KarpathyCaptions(ImageDataset):
    """A captioning dataset in Karpathy's JSON schema: {"images": [{"filepath"?, "filename", "split",
    "sentences": [{"raw", "tokens"}], "cocoid" | "imgid"}]}. One sample per image, with all its captions."""

    format_name = "coco_karpathy"
    annotation_file = "dataset_coco.json"
    layout = "ROOT/dataset_coco.json and ROOT/train2014, ROOT/val2014"
    default_image_dir = ""  # used when an entry has no "filepath" (Flickr30k)
    task_fields = ("captions",)

    def __init__(self, root: str, split: str = "train", annotations: str | None = None, images: str | None = None):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"{self.format_name}: unknown split {split!r}; expected one of {sorted(SPLITS)}")
        self.root, self.split = Path(root), split
        self.image_root = Path(images) if images else self.root
        candidates = [Path(annotations)] if annotations else [
            self.root / self.annotation_file, self.root / "annotations" / self.annotation_file]
        self.annotation_path = find_first(candidates, self.format_name, self.layout)
        entries = read_json(self.annotation_path)
        if not isinstance(entries, dict) or not isinstance(entries.get("images"), list):
            raise ValueError(f"{self.annotation_path}: expected Karpathy's schema {{\"images\": [...]}}")
        wanted = SPLITS[split]
        self.records = [e for e in entries["images"] if isinstance(e, dict) and e.get("split") in wanted]
        broken = [i for i, e in enumerate(self.records) if "filename" not in e or not isinstance(
            e.get("sentences", []), list) or not all(isinstance(x, dict) for x in e.get("sentences", []))]
        if broken:
            raise ValueError(f"{self.annotation_path}: {len(broken)} {split} image entries lack 'filename' or have "
                             f"'sentences' that is not a list of objects (the first is entry {broken[0]} of the split); "
                             "expected Karpathy's {\"filename\", \"split\", \"sentences\": [{\"raw\"}]}")

    def _sample(self, entry: dict) -> Sample:
        folder = entry.get("filepath", self.default_image_dir)
        path = self.image_root / folder / entry["filename"]
        image_id = entry.get("cocoid", entry.get("imgid", Path(entry["filename"]).stem))
        captions = [s.get("raw", " ".join(s.get("tokens", []))).strip() for s in entry.get("sentences", [])]
        return Sample(image_id=image_id, image_source=str(path), image_name=str(path), split=entry.get("split"),
                      captions=captions)


class CocoKarpathy(KarpathyCaptions):
    """COCO captions, Karpathy split (train = train + restval, 113k images; val and test 5k each)."""
