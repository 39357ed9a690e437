"""Image captioning: the candidates are the caption vocabulary, ranked word by word by the SPE queries of
the caption layout; trained teacher-forced in one parallel pass, decoded greedily or by beam search with the
decoder's key/value cache.

With a large LLM vocabulary, restrict the candidates to the tokens of the caption corpus:
`UniPerceiverConfig(caption_vocab=caption_vocabulary(tokenizer, captions))`.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from uniperceiver.text_encoder import end_of_text_id

from .base import Task, mean_count_over_ranks, register_task, require_fields, stack_images


def caption_vocabulary(tokenizer, captions: Iterable[str]) -> list[int]:
    """Sorted ids of every token of the tokenized captions, plus end-of-sequence: the caption vocabulary
    a model needs to produce (and be trained on) these captions."""
    end = end_of_text_id(tokenizer)
    if end is None:
        raise ValueError("caption_vocabulary: the tokenizer has no end-of-sequence (or [SEP]) token")
    ids = {end}
    for caption in captions:
        if not isinstance(caption, str):
            raise TypeError(f"caption_vocabulary: captions must be strings, got {type(caption).__name__}")
        ids.update(tokenizer(caption, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def caption_loss(logits: Tensor, word_indices: Tensor, lengths: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of (B, L, V) logits against (B, L) targets over the real positions only.

    In distributed training every rank's loss is its sum over words divided by the mean word count per rank,
    so that the gradients DeepSpeed (or DDP) averages over the ranks, and the losses averaged over them, are those
    of the mean over every word of the global batch, as one process with the whole batch computes them (a
    per-rank mean would weigh a rank's words by 1 / its own count)."""
    real = torch.arange(word_indices.shape[1], device=lengths.device) < lengths[:, None]
    targets = word_indices.masked_fill(~real.to(word_indices.device), -100)
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                            label_smoothing=label_smoothing, reduction="sum")
    return total / mean_count_over_ranks(real.sum()).to(total.dtype).clamp(min=1)


@register_task("captioning")
class CaptioningTask(Task):
    """batch: {"images": (B, 3, H, W), "captions": list[str]} (+ "references": list[list[str]] from
    `format_batch`, for evaluation). Loss: plain cross-entropy over the words (Uni-Perceiver uses no label
    smoothing for language modelling). Prediction: the decoded caption strings."""

    family = "caption"

    def __init__(self, beams: int = 1, max_length: int | None = None, label_smoothing: float = 0.0,
                 image_size: int = 224):
        super().__init__(image_size)
        if beams < 1:
            raise ValueError(f"captioning: beams must be >= 1, got {beams}")
        self.beams, self.max_length, self.label_smoothing = beams, max_length, label_smoothing

    def format_batch(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Samples with "image" and "caption" (a string, or a list of reference captions whose first one is
        the training target)."""
        require_fields(samples, ["image", "caption"], self.name)
        references = [[s["caption"]] if isinstance(s["caption"], str) else list(s["caption"]) for s in samples]
        empty = [i for i, refs in enumerate(references) if not refs]
        if empty:
            raise ValueError(f"task {self.name!r}: samples {empty} have no caption")
        return {"images": stack_images([s["image"] for s in samples], self.image_size),
                "captions": [refs[0] for refs in references], "references": references}

    def loss(self, model, batch: dict[str, Any]) -> Tensor:
        word_indices, lengths = model.caption_token_ids(batch["captions"])
        images = batch["images"].to(word_indices.device)
        logits = model.caption_logits(images, word_indices, lengths)
        return caption_loss(logits, word_indices, lengths, self.label_smoothing)

    @torch.no_grad()
    def predict(self, model, batch: dict[str, Any]) -> list[str]:
        images = batch["images"].to(model.caption_vocab.device)
        return model.caption(images, beams=self.beams, max_length=self.max_length)
