"""VQAv2 from the official release: the questions and annotations JSON files and the COCO images."""
from __future__ import annotations

from pathlib import Path

from ..samples import Sample
from .base import ImageDataset, find_first, read_json

# split -> (data subtype in the file names, image folder). The test questions are on the 2015 test images.
SUBTYPES = {"train": ("train2014", "train2014"), "val": ("val2014", "val2014"),
            "test": ("test2015", "test2015"), "test-dev": ("test-dev2015", "test2015")}


class VQAv2(ImageDataset):
    """One sample per question: `question`, `question_id` and (train/val) the 10 human `answers`,
    `multiple_choice_answer`, `answer_type`, `question_type`. The test splits have no annotations."""

    format_name = "vqav2"
    task_fields = ("question", "answers", "multiple_choice_answer", "answer_type")
    layout = ("ROOT/v2_OpenEnded_mscoco_{split}2014_questions.json, ROOT/v2_mscoco_{split}2014_annotations.json "
              "and ROOT/{split}2014/COCO_{split}2014_{image_id:012d}.jpg")

    def __init__(self, root: str, split: str = "train", images: str | None = None):
        super().__init__()
        if split not in SUBTYPES:
            raise ValueError(f"vqav2: unknown split {split!r}; expected one of {sorted(SUBTYPES)}")
        self.root, self.split = Path(root), split
        subtype, image_dir = SUBTYPES[split]
        self.image_dir = Path(images) if images else self.root / image_dir
        self.image_prefix = f"COCO_{image_dir}_"
        questions_name = f"v2_OpenEnded_mscoco_{subtype}_questions.json"
        self.questions_path = find_first(
            [self.root / questions_name, self.root / "questions" / questions_name], "vqav2", self.layout)
        questions = _field(read_json(self.questions_path), "questions")
        if not isinstance(questions, list):
            raise ValueError(f"{self.questions_path}: expected {{\"questions\": [...]}}")
        annotations = {}
        self.has_answers = not split.startswith("test")
        if self.has_answers:
            name = f"v2_mscoco_{subtype}_annotations.json"
            self.annotations_path = find_first([self.root / name, self.root / "annotations" / name], "vqav2",
                                               self.layout)
            entries = _field(read_json(self.annotations_path), "annotations")
            if not isinstance(entries, list):
                raise ValueError(f"{self.annotations_path}: expected {{\"annotations\": [...]}}")
            broken = [i for i, a in enumerate(entries) if not isinstance(a, dict) or "question_id" not in a
                      or not isinstance(a.get("answers"), list)
                      or not all(isinstance(x, dict) and "answer" in x for x in a["answers"])]
            if broken:
                raise ValueError(f"{self.annotations_path}: annotation {broken[0]} (of {len(broken)} such) lacks "
                                 "'question_id' or a list of {'answer': ...} 'answers'; expected the official VQAv2 "
                                 "annotations")
            annotations = {a["question_id"]: a for a in entries}
        broken = [i for i, q in enumerate(questions) if not isinstance(q, dict)
                  or not {"image_id", "question", "question_id"} <= set(q)]
        if broken:
            raise ValueError(f"{self.questions_path}: question {broken[0]} (of {len(broken)} such) lacks 'image_id', "
                             "'question' or 'question_id'; expected the official VQAv2 questions")
        self.records = [(q, annotations.get(q["question_id"])) for q in questions]

    def _sample(self, record) -> Sample:
        question, annotation = record
        image_id = question["image_id"]
        path = self.image_dir / f"{self.image_prefix}{image_id:012d}.jpg"
        sample = Sample(image_id=image_id, image_source=str(path), image_name=str(path), split=self.split,
                        question=question["question"], question_id=question["question_id"])
        if self.has_answers:
            annotation = annotation or {}
            sample.answers = [a["answer"] for a in annotation.get("answers", [])]
            sample.multiple_choice_answer = annotation.get("multiple_choice_answer")
            sample.answer_type = annotation.get("answer_type")
            sample.question_type = annotation.get("question_type")
        return sample


def _field(data, key: str):
    """data[key] of an official VQAv2 file, or None when the file is not the expected object (the caller names it)."""
    return data.get(key) if isinstance(data, dict) else None
