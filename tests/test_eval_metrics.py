"""eval.metrics against hand-computed cases (retrieval with several captions per image, VQA leave-one-out
accuracy and normalisation, CIDEr-D / BLEU against pycocoevalcap called directly), and eval.shapes end to end:
an untrained tiny model gives in-range numbers, an oracle model gives perfect ones, and the CLI runs."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from eval.metrics import (bleu, caption_tokenize, chance_recall, cider_d, exact_match_accuracy,
                          mean_per_class_recall, mean_vqa_accuracy, normalize_vqa_answer, positives_from_index,
                          retrieval_chance, retrieval_recall, topk_accuracy, vqa_accuracy)
from tiny_model import TINY_BACKBONE

# ------------------------------------------------------------------------------------------------- retrieval
# 3 images, 5 texts: texts 0, 1 describe image 0, text 2 image 1, texts 3, 4 image 2.
TEXT_TO_IMAGE = [0, 0, 1, 2, 2]
SIMILARITY = torch.tensor([
    [0.10, 0.90, 0.80, 0.30, 0.20],   # image 0: its text 1 is first                       -> hit @1
    [0.70, 0.60, 0.50, 0.40, 0.30],   # image 1: its text 2 is third                       -> hit @3
    [0.20, 0.10, 0.90, 0.35, 0.95],   # image 2: its text 4 is first (text 3 is third)     -> hit @1
])
# Columns (text -> image): text 0 ranks image 0 third, text 1 first, text 2 third, text 3 second, text 4 first.


def test_retrieval_recall_by_hand_with_several_captions_per_image():
    result = retrieval_recall(SIMILARITY, TEXT_TO_IMAGE, ks=(1, 2, 3))
    expected = {"i2t_R@1": 2 / 3, "i2t_R@2": 2 / 3, "i2t_R@3": 1.0,
                "t2i_R@1": 2 / 5, "t2i_R@2": 3 / 5, "t2i_R@3": 1.0}
    assert result == pytest.approx(expected)
    mask = positives_from_index(TEXT_TO_IMAGE, 3)
    assert retrieval_recall(SIMILARITY, positives=mask, ks=(1, 2, 3)) == pytest.approx(expected)


def clip_benchmark_recall(scores, positives, k):
    """CLIP_benchmark's definition, literally: top-k per query, a hit if any positive is among them."""
    topk = scores.topk(k, dim=1).indices
    return positives.gather(1, topk).any(dim=1).float().mean().item()


def test_retrieval_recall_equals_clip_benchmark_without_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 20, generator=generator)
    positives = positives_from_index(torch.randint(0, 7, (20,), generator=generator), 7)
    positives[:, :7] |= torch.eye(7, dtype=torch.bool)  # every image has a text
    result = retrieval_recall(scores, positives=positives, ks=(1, 3, 5))
    for k in (1, 3, 5):
        assert result[f"i2t_R@{k}"] == pytest.approx(clip_benchmark_recall(scores, positives, k))
        assert result[f"t2i_R@{k}"] == pytest.approx(clip_benchmark_recall(scores.T, positives.T, k))


def test_ties_count_as_a_random_order_and_chance_is_exact():
    # A collapsed model (all scores equal) gets exactly chance, not 1.0 or 0.0 by sort order.
    flat = torch.zeros(3, 5)
    assert retrieval_recall(flat, TEXT_TO_IMAGE, ks=(1, 2)) == pytest.approx(
        retrieval_chance(positives_from_index(TEXT_TO_IMAGE, 3), ks=(1, 2)))
    # By hand: image queries have 2, 1, 2 correct texts of 5: R@1 = (2/5 + 1/5 + 2/5) / 3;
    # R@2 = (1 - C(3,2)/C(5,2)) for two positives = 0.7, 2/5 for one -> (0.7 + 0.4 + 0.7) / 3.
    chance = retrieval_chance(positives_from_index(TEXT_TO_IMAGE, 3), ks=(1, 2))
    assert chance == pytest.approx({"i2t_R@1": 1 / 3, "i2t_R@2": 0.6, "t2i_R@1": 1 / 3, "t2i_R@2": 2 / 3})
    # The formula against every ordering of 5 candidates of which 2 are correct.
    for k in (1, 2, 3, 4):
        hits = [any(order[i] < 2 for i in range(k)) for order in itertools.permutations(range(5))]
        assert chance_recall(5, 2, k) == pytest.approx(sum(hits) / len(hits))
    # One tie: text 3's image (0.3) ties image 0 behind image 1 (0.4): R@2 = 1/2 for that text.
    tied = SIMILARITY.clone()
    tied[2, 3] = 0.30
    assert retrieval_recall(tied, TEXT_TO_IMAGE, ks=(2,))["t2i_R@2"] == pytest.approx((1 + 0.5 + 1) / 5)


def test_retrieval_errors_name_the_problem():
    with pytest.raises(ValueError, match="no correct candidate"):
        retrieval_recall(SIMILARITY, positives=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="exactly one"):
        retrieval_recall(SIMILARITY)


# -------------------------------------------------------------------------------------------- classification
def test_topk_accuracy_and_mean_per_class_recall_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0],    # label 0: right
                           [0.8, 0.1, 0.0],    # label 0: right
                           [0.1, 0.5, 0.4],    # label 0: wrong (third), top-2 wrong too
                           [0.2, 0.7, 0.1]])   # label 1: right
    labels = torch.tensor([0, 0, 0, 1])
    assert topk_accuracy(logits, labels, (1, 2, 3)) == pytest.approx({"top1": 3 / 4, "top2": 3 / 4, "top3": 1.0})
    assert mean_per_class_recall(logits, labels) == pytest.approx((2 / 3 + 1) / 2)


# ------------------------------------------------------------------------------------------------------ VQA
@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, (9 * (1 / 3) + 1 * 0) / 10),           # the 9 subsets holding the match: 1/3; the other: 0
    (2, (8 * (2 / 3) + 2 * (1 / 3)) / 10),     # = 0.6
    (3, (7 * 1 + 3 * (2 / 3)) / 10),           # = 0.9
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(matches, expected):
    answers = ["2"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_accuracy("two", answers) == pytest.approx(expected)
    assert vqa_accuracy("Two.", answers) == pytest.approx(expected)


def test_vqa_normalisation_follows_the_official_rules():
    cases = {"Two.": "2", "the dog": "dog", "isnt": "isn't", "A Red Car": "red car", "yes!": "yes",
             "none": "0", "1,000": "1000", "3.5": "3.5", " left of\n": "left of", "t-shirt": "t shirt",
             "dont know": "don't know"}
    for text, expected in cases.items():
        assert normalize_vqa_answer(text) == expected, text
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    assert mean_vqa_accuracy(["two", "no"], [["2"] * 10, ["2", "2", "2"] + ["no"] * 7]) == pytest.approx(1.0)


def test_one_reference_answer_is_exact_match():
    # The leave-one-out formula on one answer is always 0, so it refuses; exact match equals the formula
    # applied to the single answer repeated 10 times.
    with pytest.raises(ValueError, match="exact_match_accuracy"):
        vqa_accuracy("two", ["two"])
    predictions, references = ["two", "red", "Yes", "left of"], ["2", "blue", "yes", "left of"]
    assert exact_match_accuracy(predictions, references) == 0.75
    assert exact_match_accuracy(predictions, references) == pytest.approx(
        mean_vqa_accuracy(predictions, [[normalize_vqa_answer(r)] * 10 for r in references]))


# ------------------------------------------------------------------------------------------------ captioning
PREDICTIONS = ["A red circle.", "two blue stars and a green square", "a yellow triangle"]
REFERENCES = [["a red circle", "a photo of a red circle"],
              ["two blue stars and a green square", "an image of two blue stars and a green square"],
              ["a purple diamond", "a picture showing a purple diamond"]]


def test_cider_and_bleu_equal_pycocoevalcap_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {i: [caption_tokenize(p)] for i, p in enumerate(PREDICTIONS)}
    gts = {i: [caption_tokenize(r) for r in refs] for i, refs in enumerate(REFERENCES)}
    assert res[0] == ["a red circle"]
    score, scores = Cider().compute_score(gts, res)
    assert cider_d(PREDICTIONS, REFERENCES) == (pytest.approx(score), pytest.approx(list(scores)))
    assert bleu(PREDICTIONS, REFERENCES) == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0])
    assert cider_d(PREDICTIONS, REFERENCES)[0] > cider_d(PREDICTIONS[::-1], REFERENCES)[0]


def test_cider_by_hand():
    # Two images with no word in common: every 1- and 2-gram has IDF log(2) > 0, the prediction equals both
    # references (cosine 1, no length penalty), and there are no 3- or 4-grams: 10 * mean(1, 1, 0, 0) = 5.
    score, scores = cider_d({"a": "Red circle.", "b": "blue star"},
                            {"a": ["red circle", "red circle"], "b": ["blue star", "blue star"]})
    assert score == pytest.approx(5.0) and scores == pytest.approx([5.0, 5.0])


# ---------------------------------------------------------------------------------------------- eval.shapes
BACKBONE = TINY_BACKBONE


@pytest.fixture(scope="module")
def shapes_setup(tmp_path_factory):
    """A small shapes build (24 test images) and an untrained tiny model, both in a temporary cache."""
    from data_recipes.shapes import ShapesConfig, build_shapes_dataset
    from uniperceiver import UniPerceiver, tiny_config

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERN25_CACHE_DIR", str(cache))
        config = ShapesConfig(train_size=48, val_size=1, test_size=24)
        data = build_shapes_dataset(cache / "shapes", config)
        torch.manual_seed(0)
        model = UniPerceiver(tiny_config(image={"backbone_overrides": BACKBONE})).eval()
        yield {"config": config, "data": data, "model": model, "cache": cache}


def test_evaluate_shapes_on_an_untrained_model(shapes_setup):
    from eval.shapes import evaluate_shapes, format_table

    model = shapes_setup["model"].train()
    results = evaluate_shapes(model, dataset=shapes_setup["data"], config=shapes_setup["config"],
                              batch_size=16, progress=False)
    assert model.training  # put back as it came
    metrics = results["metrics"]
    expected = {f"retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {
        "classification/top1", "classification/mean_per_class_recall", "vqa/accuracy", "vqa/blind_baseline",
        "captioning/CIDEr", "captioning/BLEU-4"}
    assert expected <= set(metrics)
    assert any(key.startswith("vqa/accuracy[") for key in metrics)
    # Each question type's accuracy has its question-only baseline beside it.
    types = [key[len("vqa/accuracy["):-1] for key in metrics if key.startswith("vqa/accuracy[")]
    keys = list(metrics)
    for qa_type in types:
        assert keys.index(f"vqa/blind_baseline[{qa_type}]") == keys.index(f"vqa/accuracy[{qa_type}]") + 1
    for key, value in metrics.items():
        assert 0.0 <= value <= (10.0 if key == "captioning/CIDEr" else 1.0), (key, value)
    assert results["counts"]["images"] == 24 and results["counts"]["texts"] <= 96
    assert results["chance"]["classification/top1"] == pytest.approx(1 / 6)
    assert results["chance"]["vqa/accuracy"] == pytest.approx(1 / len(results["settings"]["answer_list"]))
    assert results["chance"]["retrieval/t2i_R@1"] == pytest.approx(1 / 24)  # one image per distinct caption
    assert results["x_chance"]["vqa/accuracy"] == pytest.approx(metrics["vqa/accuracy"] * 22)
    table = format_table(results)
    assert table.splitlines()[0] == "| metric | value | chance | x chance |"
    assert all(f"| {key} |" in table for key in metrics)
    json.dumps(results)  # JSON-able for --out and the training log
    # Side by side with another result: one column each, the value and its ratio to chance.
    from eval.shapes import format_side_by_side
    other = {**results, "metrics": {**metrics, "vqa/accuracy": 0.5}}
    lines = format_side_by_side({"test": results, "shifted": other}).splitlines()
    assert lines[0] == "| metric | test | shifted |" and len(lines) == 2 + len(metrics)
    assert f"| vqa/accuracy | {metrics['vqa/accuracy']:.4f} (" in "\n".join(lines)
    assert "| 0.5000 (" in [line for line in lines if line.startswith("| vqa/accuracy |")][0]


class OracleModel(torch.nn.Module):
    """Knows the answers: one-hot embeddings of the true image (for captions), class and answer, laid side by
    side so that each kind of candidate only sees its own part."""

    def __init__(self, rows, names, answers):
        super().__init__()
        from tasks.base import stack_images

        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the suite a device
        self.n, self.c = len(rows), len(names)
        self.names, self.answers = list(names), list(answers)
        self.index = {stack_images([row["image"]], 64)[0].numpy().tobytes(): i for i, row in enumerate(rows)}
        self.rows = [dict(row) for row in rows]
        self.dim = self.n + self.c + len(answers)

    def _rows(self, images):
        return [self.index[image.numpy().tobytes()] for image in images]

    def _vector(self, *positions):
        v = torch.zeros(self.dim)
        for p in positions:
            v[p] += 1.0
        return v

    def encode_image(self, images):
        vectors = [self._vector(i, self.n + self.rows[i]["label"]) for i in self._rows(images)]
        return F.normalize(torch.stack(vectors), dim=-1)

    def encode_text(self, texts):
        vectors = []
        for text in texts:
            if text in self.answers:
                vectors.append(self._vector(self.n + self.c + self.answers.index(text)))
            else:
                vectors.append(self._vector(*[i for i, row in enumerate(self.rows) if text in row["captions"]]))
        return F.normalize(torch.stack(vectors), dim=-1)

    def class_embeddings(self, class_names, templates=()):
        return torch.stack([self._vector(self.n + self.names.index(name)) for name in class_names])

    def vqa_query(self, images, questions):
        vectors = []
        for i, question in zip(self._rows(images), questions):
            answer = self.rows[i]["answers"][self.rows[i]["questions"].index(question)]
            vectors.append(self._vector(self.n + self.c + self.answers.index(answer)))
        return torch.stack(vectors)

    def caption(self, images, beams=1):
        return [self.rows[i]["captions"][0] for i in self._rows(images)]


def test_evaluate_shapes_gives_an_oracle_perfect_scores(shapes_setup):
    from data_recipes.shapes import answer_list, class_names
    from eval.shapes import evaluate_shapes

    config, data = shapes_setup["config"], shapes_setup["data"]
    oracle = OracleModel(data["test"], class_names(config), answer_list(config))
    results = evaluate_shapes(oracle, dataset=data, config=config, batch_size=5, progress=False)
    metrics = results["metrics"]
    for key, value in metrics.items():
        if key.startswith(("retrieval/", "classification/", "vqa/accuracy")):
            assert value == pytest.approx(1.0), key
    assert metrics["captioning/CIDEr"] > results["chance"]["captioning/CIDEr"]
    assert metrics["captioning/BLEU-4"] > 0.5
    # --limit keeps the first images only; the retrieval chance follows the smaller candidate set.
    small = evaluate_shapes(oracle, dataset=data, config=config, limit=6, progress=False, tasks=("retrieval",))
    assert small["counts"]["images"] == 6 and small["chance"]["retrieval/t2i_R@1"] == pytest.approx(1 / 6)
    assert set(small["metrics"]) == {f"retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_cli_evaluates_a_saved_model(shapes_setup, tmp_path, capsys):
    from eval.__main__ import main

    folder = shapes_setup["model"].save_pretrained(tmp_path / "export")
    out = tmp_path / "results.json"
    spec = f"shapes:{shapes_setup['cache'] / 'shapes'}?train_size=48&val_size=1&test_size=24"
    main(["shapes", "--model", str(folder), "--dataset", spec, "--limit", "4", "--out", str(out),
          "--no-progress", "--tasks", "retrieval", "vqa", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "| retrieval/i2t_R@1 |" in printed and "| vqa/accuracy |" in printed
    saved = json.loads(out.read_text())
    assert saved["counts"]["images"] == 4 and saved["model"] == str(folder)
    assert not math.isnan(saved["metrics"]["vqa/accuracy"])


def test_unknown_suite_and_bad_spec_are_clear():
    from eval import get_suite
    from eval.shapes import evaluate_shapes

    with pytest.raises(ValueError, match="registered suites: .*shapes"):
        get_suite("no_such_suite")
    with pytest.raises(ValueError, match="not a shapes SPEC"):
        evaluate_shapes(None, dataset="coco_karpathy:/data/coco")
