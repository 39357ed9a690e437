"""The metrics of the evaluation suites, computed as the field computes them (see notes/peers.md):
- retrieval recall@K with CLIP_benchmark's semantics (a query is a hit if ANY of its correct candidates is
  in its top K), several correct texts per image allowed;
- classification top-K accuracy and mean per-class recall (CLIP_benchmark's `mean_per_class_recall`);
- VQA accuracy with the official VQAv2 answer normalisation and leave-one-out soft score, and exact match
  for closed answer sets with one reference answer;
- captioning CIDEr-D and BLEU-4 through pycocoevalcap's scorers, on text tokenised in Python.

Ranking metrics are exact expectations over random tie-breaking: with no tied scores they equal the top-K
counts of CLIP_benchmark; with ties (a collapsed, untrained model scores everything alike) they equal chance
instead of depending on the sort order. The same formula gives the chance level of a random ranking.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

# ------------------------------------------------------------------------------------------------- ranking


def hit_probability(greater: int, tied_negatives: int, tied_positives: int, k: int) -> float:
    """P(some positive is in the top k) for one query whose best positive scores s, when `greater` negatives
    score above s and `tied_negatives` negatives and `tied_positives` positives (>= 1) score exactly s, ties
    ordered uniformly at random. The first positive of the tied block follows X tied negatives, with
    P(X >= x) = C(n - x, p) / C(n, p) (the first x places all negatives), n = tied_negatives + tied_positives."""
    if tied_positives < 1:
        raise ValueError("hit_probability: a query needs at least one positive")
    slots = k - greater  # how many of the tied block fit in the top k
    if slots <= 0:
        return 0.0
    n = tied_negatives + tied_positives
    if slots > tied_negatives:
        return 1.0
    return 1.0 - math.comb(n - slots, tied_positives) / math.comb(n, tied_positives)


def chance_recall(num_candidates: int, num_positives: int, k: int) -> float:
    """Expected recall@k of a uniformly random ranking of `num_candidates` with `num_positives` correct:
    1 - C(N - k, m) / C(N, m); m / N at k = 1."""
    return hit_probability(0, num_candidates - num_positives, num_positives, k)


def ranking_hits(scores, positives, ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[int, Tensor]:
    """Per-query expected hits: scores (Q, C) and a boolean positives mask (Q, C) -> {k: (Q,) values in [0, 1]}.
    Every query needs at least one positive."""
    scores = torch.as_tensor(scores).float()
    positives = torch.as_tensor(positives, dtype=torch.bool)
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(f"ranking_hits: scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must "
                         "be the same (queries, candidates) shape")
    if torch.isnan(scores).any():
        raise ValueError("ranking_hits: scores contain NaN")
    lonely = (~positives.any(dim=1)).nonzero().flatten()
    if len(lonely):
        raise ValueError(f"ranking_hits: queries {lonely[:5].tolist()} have no correct candidate")
    counts = []
    for start in range(0, scores.shape[0], chunk):  # bounds the (chunk, C) temporaries
        s, p = scores[start:start + chunk], positives[start:start + chunk]
        best = s.masked_fill(~p, -math.inf).max(dim=1, keepdim=True).values
        tied = s == best
        counts.append(torch.stack([((s > best) & ~p).sum(1), (tied & ~p).sum(1), (tied & p).sum(1)], dim=1))
    counts = torch.cat(counts).tolist()
    return {k: torch.tensor([hit_probability(g, tn, tp, k) for g, tn, tp in counts], dtype=torch.float64)
            for k in ks}


def positives_from_index(text_to_image, num_images: int | None = None) -> Tensor:
    """(n_images, n_texts) boolean mask from the image index of each text."""
    index = torch.as_tensor(text_to_image, dtype=torch.long)
    num_images = int(index.max()) + 1 if num_images is None else num_images
    if index.min() < 0 or index.max() >= num_images:
        raise ValueError(f"text_to_image: indices must be in [0, {num_images}), got {index.min()}..{index.max()}")
    mask = torch.zeros(num_images, len(index), dtype=torch.bool)
    mask[index, torch.arange(len(index))] = True
    return mask


def retrieval_recall(similarity, text_to_image=None, ks: Sequence[int] = (1, 5, 10), positives=None
                     ) -> dict[str, float]:
    """Image<->text recall@K from a (n_images, n_texts) similarity matrix, as CLIP_benchmark reports it:
    "i2t_R@k" (text retrieval): an image is a hit if ANY of its correct texts is among its top k texts;
    "t2i_R@k" (image retrieval): a text is a hit if its image (any of its images) is among its top k images.
    Give `text_to_image` (n_texts,), the image of each text, or `positives`, a (n_images, n_texts) boolean mask
    (a text may then describe several images, e.g. identical captions)."""
    similarity = torch.as_tensor(similarity).float()
    if (text_to_image is None) == (positives is None):
        raise ValueError("retrieval_recall: give exactly one of text_to_image and positives")
    if positives is None:
        positives = positives_from_index(text_to_image, similarity.shape[0])
    positives = torch.as_tensor(positives, dtype=torch.bool)
    i2t = ranking_hits(similarity, positives, ks)
    t2i = ranking_hits(similarity.T, positives.T, ks)
    return {**{f"i2t_R@{k}": float(i2t[k].mean()) for k in ks}, **{f"t2i_R@{k}": float(t2i[k].mean()) for k in ks}}


def retrieval_chance(positives, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected `retrieval_recall` of a random ranking, given how many correct candidates each query has."""
    positives = torch.as_tensor(positives, dtype=torch.bool)
    n_images, n_texts = positives.shape
    per_image, per_text = positives.sum(1).tolist(), positives.sum(0).tolist()
    out = {f"i2t_R@{k}": float(np.mean([chance_recall(n_texts, m, k) for m in per_image])) for k in ks}
    out.update({f"t2i_R@{k}": float(np.mean([chance_recall(n_images, m, k) for m in per_text])) for k in ks})
    return out


# ---------------------------------------------------------------------------------------------- classification

def _label_mask(logits: Tensor, labels) -> tuple[Tensor, Tensor]:
    logits = torch.as_tensor(logits).float()
    labels = torch.as_tensor(labels, dtype=torch.long)
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits (N, C) and labels (N,) expected, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must index the {logits.shape[1]} classes, got {labels.min()}..{labels.max()}")
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[torch.arange(len(labels)), labels] = True
    return logits, mask


def topk_accuracy(logits, labels, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: the fraction of samples whose label is among the k best-scoring classes
    (k >= the number of classes gives 1.0; CLIP_benchmark reports NaN for acc5 with under 5 classes)."""
    logits, mask = _label_mask(logits, labels)
    hits = ranking_hits(logits, mask, ks)
    return {f"top{k}": float(hits[k].mean()) for k in ks}


def mean_per_class_recall(logits, labels) -> float:
    """The mean over the classes present in `labels` of each class's top-1 recall (sklearn's
    `balanced_accuracy_score`, CLIP_benchmark's `mean_per_class_recall`)."""
    logits, mask = _label_mask(logits, labels)
    hits = ranking_hits(logits, mask, (1,))[1]
    labels = torch.as_tensor(labels, dtype=torch.long)
    return float(np.mean([float(hits[labels == c].mean()) for c in labels.unique().tolist()]))


# ------------------------------------------------------------------------------------------------------- VQA
# The official VQA evaluation's normalisation (GT-Vision-Lab/VQA vqaEval.py; LAVIS copies the same tables), table for
# table. Its quirks are kept on purpose, since they define the published numbers: the contraction keys with
# capitals never match (text is lower-cased first), "somebody'd" maps to "somebodyd", and `periodStrip`'s
# "(?!<=\d)" is a look-ahead, not the look-behind it was meant to be.
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = ("a", "an", "the")
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                   ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_process_punctuation(text: str) -> str:
    """Official `processPunctuation`: a punctuation mark next to a space (or any text with a digit-comma-digit)
    is deleted, otherwise replaced by a space; periods not followed by a digit are deleted."""
    out = text
    for mark in VQA_PUNCTUATION:
        if mark + " " in text or " " + mark in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The official call is periodStrip.sub("", outText, re.UNICODE): the flag lands in `count` (= 32).
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def vqa_process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower case, number words to digits, articles dropped, contractions
    restored ("isnt" -> "isn't")."""
    words = [VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """The official normalisation of a predicted answer: "Two." -> "2", "the dog" -> "dog", "isnt" -> "isn't"."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(answer))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against the human answers (10 in VQAv2): the mean over the
    leave-one-out subsets (each answer left out in turn) of min(1, #matches in the subset / 3). So an answer
    given by 3 or more of 10 annotators scores 1 only if 4 gave it: 3 matches -> (7 * 1 + 3 * 2/3) / 10 = 0.9.

    As officially: the prediction is fully normalised (`normalize_vqa_answer`); the human answers are taken as
    written (VQAv2's annotations are normalised already) and only have their punctuation processed when they
    disagree. With a single reference the only leave-one-out subset is empty and every prediction scores 0:
    closed answer sets with one reference use `exact_match_accuracy` (the formula on that reference repeated
    10 times)."""
    if len(gt_answers) < 2:
        raise ValueError(f"vqa_accuracy: the leave-one-out formula needs several human answers, got {len(gt_answers)}"
                         " (one reference: use exact_match_accuracy)")
    prediction = normalize_vqa_answer(prediction)
    answers = list(gt_answers)
    if len(set(answers)) > 1:
        answers = [vqa_process_punctuation(answer) for answer in answers]
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    return float(np.mean([min(1.0, (total - hit) / 3) for hit in matches]))


def mean_vqa_accuracy(predictions: Sequence[str], gt_answers: Sequence[Sequence[str]]) -> float:
    """`vqa_accuracy` averaged over questions."""
    if len(predictions) != len(gt_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(gt_answers)} questions")
    return float(np.mean([vqa_accuracy(p, a) for p, a in zip(predictions, gt_answers)])) if predictions else 0.0


def exact_match_accuracy(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """The fraction of predictions equal to their single reference, both normalised by `normalize_vqa_answer`
    (so "two" matches "2"): VQA accuracy for a closed answer set with one answer per question."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    prepare = normalize_vqa_answer if normalize else (lambda text: text)
    return float(np.mean([prepare(p) == prepare(r) for p, r in zip(predictions, references)]))


# ------------------------------------------------------------------------------------------------ captioning
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def caption_tokenize(text: str) -> str:
    """Lower-cased words joined by single spaces, punctuation dropped: what pycocoevalcap's PTBTokenizer
    produces for plain sentences such as the shapes captions, in Python (the PTBTokenizer runs Java).
    It differs on contractions ("don't" stays one token; PTB splits "do n't")."""
    return " ".join(_WORD.findall(text.lower()))


def _score_inputs(predictions: Mapping | Sequence[str], references: Mapping | Sequence[Sequence[str]],
                  tokenize: bool) -> tuple[dict, dict]:
    if not isinstance(predictions, Mapping):
        predictions = dict(enumerate(predictions))
    if not isinstance(references, Mapping):
        references = dict(enumerate(references))
    if set(predictions) != set(references):
        raise ValueError(f"captioning: {len(predictions)} predictions and {len(references)} reference sets "
                         "must have the same ids")
    prepare = caption_tokenize if tokenize else (lambda text: text)
    res = {key: [prepare(predictions[key])] for key in predictions}
    gts = {}
    for key, refs in references.items():
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"captioning: image {key!r} has no reference caption")
        gts[key] = [prepare(ref) for ref in refs]
    return res, gts


def _pycocoevalcap(module: str, name: str):
    try:
        return getattr(__import__(f"pycocoevalcap.{module}.{module}", fromlist=[name]), name)
    except ImportError as error:
        raise ImportError("captioning metrics need pycocoevalcap: pip install pycocoevalcap") from error


def cider_d(predictions, references, tokenize: bool = True) -> tuple[float, list[float]]:
    """Corpus CIDEr-D (pycocoevalcap's `Cider`: TF-IDF n-grams 1-4, clipped counts, Gaussian length penalty
    sigma 6, x10) and the per-image scores. predictions: {id: caption} or a list; references: {id: [captions]}
    or a list of lists. The IDF comes from the references scored, so a subset scores differently from the
    whole split; with one image every n-gram has IDF <= 0 and the score is meaningless."""
    res, gts = _score_inputs(predictions, references, tokenize)
    score, scores = _pycocoevalcap("cider", "Cider")().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def bleu(predictions, references, tokenize: bool = True, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (pycocoevalcap's `Bleu`, "closest" reference length), as COCO caption evaluation
    reports them; [-1] is BLEU-4."""
    res, gts = _score_inputs(predictions, references, tokenize)
    score, _ = _pycocoevalcap("bleu", "Bleu")(n).compute_score(gts, res, verbose=0)
    return [float(s) for s in score]


def ratio_to_chance(value: float | None, chance: float | None) -> float | None:
    """value / chance, or None where the chance level is 0 or unknown."""
    if value is None or chance is None or chance <= 0:
        return None
    return value / chance


__all__ = ["bleu", "caption_tokenize", "chance_recall", "cider_d", "exact_match_accuracy", "hit_probability",
           "mean_per_class_recall", "mean_vqa_accuracy", "normalize_vqa_answer", "positives_from_index",
           "ranking_hits", "ratio_to_chance", "retrieval_chance", "retrieval_recall", "topk_accuracy",
           "vqa_accuracy"]
