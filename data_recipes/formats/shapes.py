"""The built-in synthetic "shapes" dataset (data_recipes.shapes) as `Sample`s, so it goes through the same
factory, skipper and checker as the real formats: `shapes[:FOLDER]?split=val&train_size=500&seed=1`."""
from __future__ import annotations

import dataclasses
import typing

from ..samples import Sample
from ..shapes import count_groundings, phrase_groundings
from .base import ImageDataset


def _config_from_options(options: dict[str, str]):
    from ..shapes import ShapesConfig

    known = {f.name: f for f in dataclasses.fields(ShapesConfig)}
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ValueError(f"shapes: unknown option(s) {unknown}; it accepts split, task and {sorted(known)}")
    hints = typing.get_type_hints(ShapesConfig)
    values = {}
    for name, text in options.items():
        kind = hints[name]
        if kind in (int, float):
            values[name] = kind(text)
        elif typing.get_origin(kind) is tuple:
            values[name] = tuple(v.strip() for v in text.split(",") if v.strip())
        else:
            values[name] = text
    return ShapesConfig(**values)


class ShapesSamples(ImageDataset):
    """One sample per image (`captions`, `label`, `boxes`, `categories`; the question-answer pairs in
    `extra["questions"]`, `extra["qa_answers"]`, and for each question the phrases that name one object,
    [start, end, box index], -1 for none there, in `extra["qa_groundings"]`, and the counting phrases with every
    object they name, [start, end, [box indices]], in `extra["qa_count_groundings"]`), or with `task=vqa` one
    sample per question."""

    format_name = "shapes"
    layout = "generated on first use into FOLDER (default: the project cache) as a Hugging Face dataset"

    def __init__(self, root: str | None = None, split: str = "train", task: str = "image", **config):
        super().__init__()
        from ..shapes import build_shapes_dataset, class_names

        if task not in ("image", "vqa"):
            raise ValueError(f"shapes: unknown task {task!r}; expected 'image' or 'vqa'")
        shapes_config = _config_from_options(config)
        data = build_shapes_dataset(root, shapes_config)
        if split not in data:
            raise ValueError(f"shapes: no split {split!r}; the dataset has {sorted(data)}")
        self.split, self.task, self.data = split, task, data[split]
        self.class_names = list(class_names(shapes_config))
        self.categories = dict(enumerate(shapes_config.shapes))
        self.colours = dict(enumerate(shapes_config.colours))
        if task == "vqa":
            self.task_fields = ("question", "answers")
            self.records = [(row, q) for row, questions in enumerate(self.data["questions"])
                            for q in range(len(questions))]
        else:
            self.task_fields = ("captions", "label", "boxes", "categories")
            self.records = [(row, None) for row in range(len(self.data))]

    def _sample(self, record) -> Sample:
        row_index, question_index = record
        row = self.data[row_index]
        sample = Sample(image_id=row["image_id"], image_source=row["image"],
                        image_name=f"shapes[{self.split}][{row_index}]", split=self.split)
        if question_index is not None:
            answer = row["answers"][question_index]
            sample.question, sample.question_id = row["questions"][question_index], (row["image_id"], question_index)
            sample.answers, sample.multiple_choice_answer = [answer], answer
            sample.answer_type = row["qa_types"][question_index]
            return sample
        category_ids = list(row["objects"]["category"])
        sample.captions, sample.label = list(row["captions"]), row["label"]
        sample.boxes = [[float(v) for v in box] for box in row["objects"]["bbox"]]
        sample.category_ids, sample.categories = category_ids, [self.categories[c] for c in category_ids]
        kinds = [(self.colours[c], self.categories[k]) for c, k in zip(row["objects"]["colour"], category_ids)]
        sample.extra = {"questions": list(row["questions"]), "qa_answers": list(row["answers"]),
                        "qa_groundings": [phrase_groundings(q, kinds) for q in row["questions"]],
                        "qa_count_groundings": [count_groundings(q, kinds) for q in row["questions"]]}
        return sample
