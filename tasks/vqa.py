"""Visual question answering. Two ways to answer, one task:
- "rank" (Uni-Perceiver's VQA): the SPE query after [image, question] is ranked against every answer of an
  answer list, each encoded as a text; cross-entropy with label smoothing over the list.
- "generate" (open-ended): the answer is a short caption conditioned on [image, question], trained with the
  captioning loss and decoded by the caption machinery (greedy or beam search with the key/value cache).

VQAv2's answer list is its `top_k` = 3,129 most frequent answers: `vqav2_answer_list(annotations.json)`.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Task, register_task, require_fields, stack_images
from .captioning import caption_loss
from .grounding import count_loss, count_targets, grounding_loss, input_boxes, pair_targets, phrase_targets

VQAV2_NUM_ANSWERS = 3129


class _PhraseField(NamedTuple):
    """A whole-picture sample's per-question phrase lists, [start, end, target], and what a target is: its name in
    error messages, how it is checked against the picture's box count, and the boxes it stands for."""
    name: str
    phrases: str
    target: str
    indices: str
    valid: Callable[[Any, int], bool]
    resolve: Callable[[Any, list], Any]


# a phrase naming one object (box index, -1 for none there); a counting phrase with every object it counts
_GROUNDINGS = _PhraseField("qa_groundings", "phrases", "box index", "an index into its {} boxes (-1: names no object)",
                           lambda target, count: isinstance(target, int) and -1 <= target < count,
                           lambda target, boxes: boxes[target] if target >= 0 else None)
_COUNT_GROUNDINGS = _PhraseField("qa_count_groundings", "counting phrases", "[box indices]",
                                 "indices into its {} boxes",
                                 lambda target, count: isinstance(target, (list, tuple)) and all(
                                     isinstance(b, int) and 0 <= b < count for b in target),
                                 lambda target, boxes: [boxes[b] for b in target])
MODES = ("rank", "generate")


def normalize_answer(answer: str) -> str:
    """Lower case, single spaces, no surrounding spaces or final period: "Yes." and " yes" are one answer."""
    return re.sub(r"\s+", " ", answer.strip().lower()).rstrip(".").strip()


def vqav2_answer_list(annotations_json_path: str | Path | Sequence[str | Path],
                      top_k: int = VQAV2_NUM_ANSWERS) -> list[str]:
    """The `top_k` most frequent `multiple_choice_answer`s of official VQAv2 annotation files (e.g.
    v2_mscoco_train2014_annotations.json, optionally with the val file), most frequent first, ties in
    alphabetical order; answers are normalised by `normalize_answer`."""
    paths = [annotations_json_path] if isinstance(annotations_json_path, (str, Path)) else annotations_json_path
    if top_k < 1:
        raise ValueError(f"vqav2_answer_list: top_k must be >= 1, got {top_k}")
    counts: Counter[str] = Counter()
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"VQAv2 annotations file {path} does not exist (expected the official "
                                    "v2_mscoco_*_annotations.json)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"VQAv2 annotations file {path} is not valid JSON: {error}") from error
        annotations = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(annotations, list):
            raise ValueError(f"VQAv2 annotations file {path}: expected a JSON object with an 'annotations' list "
                             "(the official v2_mscoco_*_annotations.json format)")
        for i, annotation in enumerate(annotations):
            answer = annotation.get("multiple_choice_answer") if isinstance(annotation, dict) else None
            if not isinstance(answer, str):
                raise ValueError(f"VQAv2 annotations file {path}: annotations[{i}] has no string "
                                 "'multiple_choice_answer'")
            counts[normalize_answer(answer)] += 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [answer for answer, _ in ranked[:top_k]]


def answer_separation(answer_embeddings: Tensor, margin: float, logit_scale: Tensor) -> Tensor:
    """How far the answers embed alike beyond `margin` (cosine), in logit units (the scale without its
    gradient): for each answer, scale * relu(cos - margin) summed over the others, averaged over the answers.
    A ranking loss moves the query along the difference of the answers' embeddings; where those nearly coincide
    it cannot learn to tell the answers apart, and the answers stay together while the query cannot."""
    embeddings = F.normalize(answer_embeddings.float(), dim=-1)
    count = embeddings.shape[0]
    if count < 2:
        return embeddings.sum() * 0.0
    cosines = embeddings @ embeddings.T
    others = ~torch.eye(count, dtype=torch.bool, device=cosines.device)
    return (logit_scale.detach() * F.relu(cosines[others] - margin)).sum() / count


@register_task("vqa")
class VQATask(Task):
    """batch: {"images": (B, 3, H, W), "questions": list[str], "answers": list[str] (targets),
    "answer_list": list[str] (candidates, mode "rank"; every target must be in it: leave out, or map, the
    questions whose answer is not, as VQAv2 training does), optionally "image_index": list[int] (question i asks
    about picture image_index[i]; without it, about picture i)}. Predictions: answer strings, one per question.
    With several ranks and whole pictures, each rank's loss is the mean over its own questions (their number
    varies with the pictures), as with any batch of variable size.

    mode: "rank" over the answer list, or "generate" open-ended answers (no answer list needed).
    label_smoothing: of the ranking loss, 0.1 as Uni-Perceiver; the generation loss is plain cross-entropy.
    beams, max_length: decoding of "generate".
    grounding_weight: with a model built with `detection.ground_text`, the weight of the loss that teaches each
        phrase naming one object (the samples' "qa_groundings": per question, [start, end, box index] into
        "boxes", -1 for a phrase that names no object there) to attend to that object's context region, or to
        the layer's "no object" slot (`tasks/grounding.py`), and, with `detection.ground_relations`, each later
        phrase of a question to pair with the one before it; 0 leaves it out. Whole
        pictures must then carry "qa_groundings"; one-question samples have none and train the answers alone.
    count_weight: with a model built with `detection.ground_counts`, the weight of the loss that teaches each
        counting phrase (the samples' "qa_count_groundings": per question, [start, end, [box indices]]) to match
        the context regions of the objects it names and no other (`tasks.grounding.count_targets`); 0 leaves it
        out. Needs grounding_weight > 0 (it reads the same boxes).
    answer_margin: keep every two answers of the list at cosine <= this (a hinge, in logit units): answers that
        embed alike ("left of" and "right of" reach 0.999) leave the query no gradient to learn them apart. A
        training term: left out in eval mode, so that a validation loss measures the answers.
    """

    family = "vqa"

    @classmethod
    def reads_boxes(cls, kwargs: dict[str, Any]) -> bool:
        """The grounding loss reads the boxes of the objects the questions name."""
        return bool(kwargs.get("grounding_weight", 0))

    def __init__(self, answer_list: Sequence[str] | None = None, mode: str = "rank", label_smoothing: float = 0.1,
                 beams: int = 1, max_length: int | None = None, grounding_weight: float = 0.0,
                 answer_margin: float | None = None, image_size: int = 224, count_weight: float = 0.0):
        super().__init__(image_size)
        if mode not in MODES:
            raise ValueError(f"vqa: unknown mode {mode!r}; expected one of {MODES}")
        for name, weight in (("grounding_weight", grounding_weight), ("count_weight", count_weight)):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
                raise ValueError(f"vqa: {name} {weight!r}; expected a finite number >= 0")
        if count_weight and not grounding_weight:
            raise ValueError("vqa: count_weight needs grounding_weight > 0 (the phrases' boxes come with it)")
        if answer_margin is not None and (isinstance(answer_margin, bool) or not isinstance(
                answer_margin, (int, float)) or not -1 <= answer_margin <= 1):
            raise ValueError(f"vqa: answer_margin {answer_margin!r}; expected a cosine in [-1, 1] or null")
        if mode == "generate" and (grounding_weight or answer_margin is not None):
            raise ValueError("vqa: grounding_weight and answer_margin belong to mode 'rank'")
        self.answer_list = list(answer_list) if answer_list is not None else None
        self.mode, self.label_smoothing, self.beams, self.max_length = mode, label_smoothing, beams, max_length
        self.grounding_weight, self.answer_margin = float(grounding_weight), answer_margin
        self.count_weight = float(count_weight)

    def format_batch(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Samples with "image", "question" and "answer" (normalised by `normalize_answer`), one question each;
        or samples of whole pictures with every question asked of them, "questions" and "qa_answers" (lists,
        as the shapes data gives without `task=vqa`), when the batch also gets "image_index" (question ->
        picture). The task's answer list goes into the batch."""
        if samples and all("question" not in s and "questions" in s for s in samples):
            batch = self._format_grouped(samples)
        else:
            require_fields(samples, ["image", "question", "answer"], self.name)
            batch = {"images": stack_images([s["image"] for s in samples], self.image_size),
                     "questions": [s["question"] for s in samples],
                     "answers": [normalize_answer(s["answer"]) for s in samples]}
        if self.answer_list is not None:
            batch["answer_list"] = self.answer_list
        return batch

    def _format_grouped(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Every question of each picture in one batch: the picture's tokens are computed once for all of them
        (`UniPerceiver.vqa_query(image_index=...)`), so a step trains on about five times the questions of a
        one-question-per-picture batch for the same backbone work."""
        require_fields(samples, ["image", "questions", "qa_answers"] + (
            ["qa_groundings", "boxes"] if self.grounding_weight else []) + (
            ["qa_count_groundings"] if self.count_weight else []), self.name)
        image_index, questions, answers, groundings = [], [], [], []
        for i, sample in enumerate(samples):
            asked, answered = sample["questions"], sample["qa_answers"]
            if not isinstance(asked, (list, tuple)) or not isinstance(answered, (list, tuple)) or len(asked) != len(
                    answered):
                raise ValueError(f"task {self.name!r}: sample {i} needs lists 'questions' and 'qa_answers' of one "
                                 f"length, got {type(asked).__name__} of {len(asked)} and "
                                 f"{type(answered).__name__} of {len(answered)}")
            image_index += [i] * len(asked)
            questions += list(asked)
            answers += [normalize_answer(answer) for answer in answered]
        if not questions:
            raise ValueError(f"task {self.name!r}: no picture of the batch has a question")
        batch = {"images": stack_images([s["image"] for s in samples], self.image_size),
                 "questions": questions, "answers": answers, "image_index": image_index}
        if self.grounding_weight:  # after stack_images, whose errors name a bad picture
            groundings, counted = [], []
            for i, sample in enumerate(samples):
                boxes = self._input_boxes(sample, i)
                groundings += self._phrases(sample, i, _GROUNDINGS, boxes)
                if self.count_weight:
                    counted += self._phrases(sample, i, _COUNT_GROUNDINGS, boxes)
            batch["groundings"] = groundings
            if self.count_weight:
                batch["count_groundings"] = counted
        return batch

    def _phrases(self, sample: dict[str, Any], i: int, field: _PhraseField, boxes: list[list[float]]) -> list:
        """A sample's phrase lists (`field`: "qa_groundings" or "qa_count_groundings"), checked, with each target's
        box indices replaced by those boxes in input pixels (xyxy)."""
        phrases, count = sample[field.name], len(sample["questions"])
        if not isinstance(phrases, (list, tuple)) or len(phrases) != count:
            raise ValueError(f"task {self.name!r}: sample {i} needs {field.name!r} as a list of one list of "
                             f"{field.phrases} per question ({count}), got {phrases!r:.200}")
        out = []
        for question, asked in zip(phrases, sample["questions"]):
            def good(p):
                return (isinstance(p, (list, tuple)) and len(p) == 3 and isinstance(p[0], int)
                        and isinstance(p[1], int) and 0 <= p[0] < p[1] <= len(asked) and field.valid(p[2], len(boxes)))
            bad = [p for p in question if not good(p)] if isinstance(question, (list, tuple)) else [question]
            if bad:
                raise ValueError(f"task {self.name!r}: sample {i}: {field.name!r} entries {bad} are not [start, end, "
                                 f"{field.target}] with 0 <= start < end <= {len(asked)} (the question's characters) "
                                 f"and {field.indices.format(len(boxes))}")
            out.append([(start, end, field.resolve(target, boxes)) for start, end, target in question])
        return out

    def _input_boxes(self, sample: dict[str, Any], i: int) -> list[list[float]]:
        """A sample's COCO boxes in input pixels (xyxy), once for all its phrase lists."""
        try:
            return input_boxes(sample["image"], sample["boxes"], self.image_size)
        except (TypeError, ValueError) as error:
            raise ValueError(f"task {self.name!r}: sample {i}: 'boxes' must be COCO [x, y, width, height] lists: "
                             f"{error}") from error

    def _answer_list(self, batch: dict[str, Any]) -> list[str]:
        answer_list = batch.get("answer_list", self.answer_list)
        if not answer_list:
            raise ValueError(f"task {self.name!r} (mode 'rank') needs an answer list: give the batch an "
                             "'answer_list' or the task answer_list=...")
        return list(answer_list)

    def targets(self, batch: dict[str, Any]) -> Tensor:
        """(B,) indices of the target answers in the answer list."""
        answer_list = self._answer_list(batch)
        index = {answer: i for i, answer in enumerate(answer_list)}
        missing = [answer for answer in batch["answers"] if answer not in index]
        if missing:
            raise ValueError(f"task {self.name!r}: answers {missing[:5]} are not in the answer list of "
                             f"{len(answer_list)} answers")
        return torch.tensor([index[answer] for answer in batch["answers"]])

    @staticmethod
    def _question_images(batch: dict[str, Any], images: Tensor) -> Tensor:
        """One picture per question: a grouped batch's pictures repeated along its "image_index"."""
        index = batch.get("image_index")
        return images if index is None else images[torch.as_tensor(index, device=images.device)]

    def loss(self, model, batch: dict[str, Any]) -> Tensor:
        device = model.caption_vocab.device
        images = batch["images"].to(device)
        if self.mode == "generate":
            word_indices, lengths = model.caption_token_ids(batch["answers"])
            logits = model.caption_logits(self._question_images(batch, images), word_indices, lengths,
                                          prompts=batch["questions"])
            return caption_loss(logits, word_indices, lengths)
        targets = self.targets(batch).to(device)
        queries, grounding = model.vqa_query_and_grounding(images, batch["questions"],
                                                           image_index=batch.get("image_index"))
        answers = model.encode_text(self._answer_list(batch))
        logits = model.readout.similarity(queries, answers, self.family)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if self.grounding_weight and grounding is None:
            raise ValueError(f"task {self.name!r}: grounding_weight needs a model built with "
                             "model.detection.ground_text: true (and context_regions >= 1)")
        # Only whole pictures carry their phrases' objects ("qa_groundings"); a batch of one question per sample
        # (the validation split's) trains and scores the answers alone.
        if self.grounding_weight and "groundings" in batch:
            phrase = phrase_targets(grounding.offsets, batch["groundings"], grounding.boxes, grounding.valid)
            loss = loss + self.grounding_weight * grounding_loss(grounding.logits, phrase)
            if grounding.pairs is not None:
                pairs = pair_targets(phrase, grounding.boxes.shape[1])
                loss = loss + self.grounding_weight * grounding_loss(grounding.pairs, pairs)
        if self.count_weight and "count_groundings" in batch:
            if grounding.counts is None:
                raise ValueError(f"task {self.name!r}: count_weight needs a model built with "
                                 "model.detection.ground_counts: true")
            counted = count_targets(grounding.offsets, batch["count_groundings"], grounding.boxes, grounding.valid)
            loss = loss + self.count_weight * count_loss(grounding.counts, counted)
        if self.answer_margin is not None and model.training:  # a training term, as weight decay is
            loss = loss + answer_separation(answers, self.answer_margin, model.readout.scale(self.family))
        return loss

    @torch.no_grad()
    def predict(self, model, batch: dict[str, Any]) -> list[str]:
        images = self._question_images(batch, batch["images"].to(model.caption_vocab.device))
        if self.mode == "generate":
            return model.answer(images, batch["questions"], beams=self.beams, max_length=self.max_length)
        return model.answer(images, batch["questions"], self._answer_list(batch))
