"""Hugging Face datasets from a local folder: one written by `Dataset.save_to_disk`, or any folder
`datasets.load_dataset(path)` reads (imagefolder with metadata.jsonl, csv/json/parquet files)."""
from __future__ import annotations

from ..samples import Sample
from .base import ImageDataset, require

# column option -> names tried when the option is not given
DEFAULT_COLUMNS = {"image": ("image", "img", "jpg", "png", "image_path", "file_name"),
                   "caption": ("caption", "captions", "text", "sentences"),
                   "label": ("label", "labels"), "question": ("question",),
                   "answers": ("answers", "answer"), "id": ("image_id", "id")}
TASK_FIELDS = {"caption": "captions", "label": "label", "question": "question", "answers": "answers"}


class HFDataset(ImageDataset):
    """Map-style view of a local Hugging Face dataset split. Columns are named in the spec (`image=`, `caption=`,
    `label=`, `question=`, `answers=`, `id=`) or found by their usual names. Image columns are read undecoded
    (`Image(decode=False)`) so a corrupt image is a counted skip, not a crash; a string column is a path
    relative to ROOT. A ClassLabel label column gives `.class_names`."""

    format_name = "hf"
    layout = "ROOT written by Dataset(Dict).save_to_disk, or a folder datasets.load_dataset(ROOT) reads"

    def __init__(self, root: str, split: str = "train", cache_dir: str | None = None, **columns: str):
        super().__init__()
        import datasets

        unknown = set(columns) - set(DEFAULT_COLUMNS)
        if unknown:
            raise ValueError(f"hf: unknown option(s) {sorted(unknown)}; column options are {sorted(DEFAULT_COLUMNS)}")
        self.root = require(root, self.format_name, self.layout, kind="folder")
        self.split = split
        if (self.root / "dataset_dict.json").is_file() or (self.root / "state.json").is_file():
            loaded = datasets.load_from_disk(str(self.root))
        else:
            loaded = datasets.load_dataset(str(self.root), cache_dir=cache_dir)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{self.root}: no split {split!r}; the dataset has {sorted(loaded)}")
            loaded = loaded[split]
        names = loaded.column_names
        self.columns = {}
        for option, candidates in DEFAULT_COLUMNS.items():
            if option in columns:
                if columns[option] not in names:
                    raise ValueError(f"{self.root}: no column {columns[option]!r} (given as {option}=); "
                                     f"the columns are {names}")
                self.columns[option] = columns[option]
            else:
                found = next((c for c in candidates if c in names), None)
                if found:
                    self.columns[option] = found
        if "image" not in self.columns:
            raise ValueError(f"{self.root}: no image column among {names}; name it with image=COLUMN")
        image_column = self.columns["image"]
        if isinstance(loaded.features[image_column], datasets.Image):
            loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
        label_feature = loaded.features.get(self.columns.get("label"))
        if isinstance(label_feature, datasets.ClassLabel):
            self.class_names = list(label_feature.names)
        self.task_fields = tuple(TASK_FIELDS[o] for o in TASK_FIELDS if o in self.columns)
        self.records = loaded

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        row = self.records[int(index)]
        image = row[self.columns["image"]]
        if isinstance(image, str):
            image = str(self.root / image)
            name = image
        elif isinstance(image, dict) and image.get("path") and not image.get("bytes"):
            image = {"path": str(self.root / image["path"]), "bytes": None}  # a relative path is under ROOT
            name = image["path"]
        else:
            name = f"{self.root}[{self.split}][{index}]" + (f" ({image['path']})" if isinstance(image, dict)
                                                           and image.get("path") else "")
        sample = Sample(image_id=row[self.columns["id"]] if "id" in self.columns else index,
                        image_source=image, image_name=name, split=self.split)
        used = set(self.columns.values())
        if "caption" in self.columns:
            caption = row[self.columns["caption"]]
            sample.captions = [caption] if isinstance(caption, str) else [str(c) for c in caption or []]
        if "label" in self.columns:
            sample.label = row[self.columns["label"]]
        if "question" in self.columns:
            sample.question = row[self.columns["question"]]
        if "answers" in self.columns:
            answers = row[self.columns["answers"]]
            sample.answers = [answers] if isinstance(answers, str) else list(answers or [])
        sample.extra = {k: v for k, v in row.items() if k not in used}
        return sample
