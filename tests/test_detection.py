"""Detection through the shared decoder: the proposal network's assignment and losses on hand-made boxes, region
matching, pycocotools' metrics on cases worked by hand, the coco_detection suite on a fixture in COCO's layout,
`detect` with an LVIS-sized name list, and a tiny model that learns to box and name four shapes pictures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from tiny_model import TINY_BACKBONE, offline_cache  # noqa: F401  (a fixture)
from uniperceiver.region_proposals import (DensePredictions, RegionConfig, RegionProposalNetwork, box_encoding,
                                           decode_boxes, match_regions)

DETECTION = {"levels": [1, 2, 3], "width": 32, "depth": 1, "num_proposals": 8, "pre_nms_top_k": 100}


def network() -> RegionProposalNetwork:
    return RegionProposalNetwork(RegionConfig(levels=(1, 2, 3)), channels=[8, 16, 32], strides=[8, 16, 32])


def dense_for(rpn: RegionProposalNetwork, size: int = 64) -> DensePredictions:
    maps = [torch.zeros(1, c, size // s, size // s) for c, s in zip((8, 16, 32), (8, 16, 32))]
    return rpn(maps)


# ------------------------------------------------------------------------------------------ proposal network
def test_assignment_takes_the_centre_of_each_box_on_the_level_of_its_size():
    rpn = network()
    dense = dense_for(rpn)
    boxes = torch.tensor([[8.0, 8.0, 30.0, 30.0],     # side 22 <= 4 x 8: the stride-8 level
                          [2.0, 40.0, 6.0, 44.0],     # smaller than a stride: still one location
                          [0.0, 0.0, 64.0, 60.0],     # side 64 <= 4 x 16: the stride-16 level
                          [0.0, 0.0, 96.0, 96.0]])    # side 96 > 4 x 16: the stride-32 level
    assigned = rpn.assign(dense, boxes)
    for index, level in ((0, 0), (1, 0), (2, 1), (3, 2)):
        where = (assigned == index).nonzero(as_tuple=True)[0]
        assert len(where) >= 1, f"box {index} has no positive location"
        assert (dense.level_ids[where] == level).all()
        centre = (boxes[index, :2] + boxes[index, 2:]) / 2
        assert ((dense.points[where] - centre).abs() <= 1.5 * dense.strides[where, None] + 1e-6).all()
    # the first box's positives: the stride-8 points inside it within 1.5 strides of its centre (19, 19)
    first = dense.points[assigned == 0].tolist()
    assert sorted(first) == [[12.0, 12.0], [12.0, 20.0], [12.0, 28.0], [20.0, 12.0], [20.0, 20.0], [20.0, 28.0],
                             [28.0, 12.0], [28.0, 20.0], [28.0, 28.0]]
    assert (rpn.assign(dense, torch.zeros(0, 4)) == -1).all()


def test_losses_vanish_for_perfect_boxes_and_grow_for_wrong_ones():
    rpn = network()
    dense = dense_for(rpn)
    box = torch.tensor([[8.0, 8.0, 30.0, 30.0]])
    assigned = rpn.assign(dense, box)
    positive = assigned >= 0
    exact = torch.cat([dense.points - box[:, :2], box[:, 2:] - dense.points], dim=1).clamp(min=0.1)
    perfect = dense._replace(distances=exact[None], objectness=torch.where(positive, 9.0, -9.0)[None])
    losses = rpn.losses(perfect, [box])
    assert losses["giou"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["l1"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["objectness"].item() < 1e-3
    wrong = perfect._replace(distances=exact[None] * 2, objectness=-perfect.objectness)
    bad = rpn.losses(wrong, [box])
    assert bad["giou"] > 0.1 and bad["l1"] > 0.1 and bad["objectness"] > 1.0
    assert all(torch.isfinite(v) for v in rpn.losses(dense, [torch.zeros(0, 4)]).values())


def test_proposals_are_clipped_non_maximum_suppressed_and_padded():
    rpn = network()
    dense = dense_for(rpn)
    box = torch.tensor([10.0, 10.0, 30.0, 30.0])
    distances = torch.cat([dense.points - box[:2], box[2:] - dense.points], dim=1).abs() + 1
    scores = torch.full_like(dense.objectness, -9.0)
    scores[0, :3] = torch.tensor([5.0, 4.0, 3.0])  # three locations, nearly one box after decoding
    predicted = dense._replace(distances=distances[None], objectness=scores, centreness=torch.zeros_like(scores))
    proposals = rpn.propose(predicted, (64, 64), num_proposals=8)
    assert proposals.boxes.shape == (1, 8, 4) and proposals.valid.shape == (1, 8)
    assert (proposals.boxes >= 0).all() and (proposals.boxes <= 64).all()
    assert proposals.scores[0].tolist() == sorted(proposals.scores[0].tolist(), reverse=True)
    assert proposals.scores[0, ~proposals.valid[0]].eq(0).all()
    kept = proposals.boxes[0, proposals.valid[0]]
    iou = torch.triu(__import__("torchvision").ops.box_iou(kept, kept), diagonal=1)
    assert (iou <= 0.6 + 1e-6).all()


def test_match_regions_and_box_encoding():
    regions = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [5.0, 5.0, 5.0, 5.0]])
    truth = torch.tensor([[21.0, 21.0, 30.0, 30.0], [0.0, 0.0, 10.0, 12.0], [5.0, 5.0, 5.0, 5.0]])
    index, matched = match_regions(regions, truth, 0.5)
    assert index[:2].tolist() == [1, 0] and matched.tolist() == [True, True, False]  # degenerate: no overlap
    assert not match_regions(regions, torch.zeros(0, 4))[1].any()
    encoded = box_encoding(regions, (64, 64), 4)
    assert encoded.shape == (3, 32) and encoded.abs().max() <= 1.0
    assert torch.equal(decode_boxes(torch.tensor([[5.0, 5.0]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]])),
                       torch.tensor([[4.0, 3.0, 8.0, 9.0]]))


# ------------------------------------------------------------------------------------------------ metrics
def ground_truth() -> dict:
    return {"images": [{"id": 7, "width": 100, "height": 100}, {"id": 9, "width": 100, "height": 100}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 40, 40], "area": 1600,
                             "iscrowd": 0}],
            "categories": [{"id": 3, "name": "circle"}, {"id": 8, "name": "star"}]}


def test_coco_box_metrics_on_cases_worked_by_hand():
    from eval.detection import coco_box_metrics

    exact = [{"image_id": 7, "category_id": 3, "bbox": [10, 10, 40, 40], "score": 0.9}]
    assert coco_box_metrics(ground_truth(), exact)["AP"] == pytest.approx(1.0)
    # IoU 0.6 (a 40x40 box shifted by 10 px: 1200 / 2000): right at thresholds .50, .55, .60 of ten
    shifted = [{"image_id": 7, "category_id": 3, "bbox": [20, 10, 40, 40], "score": 0.9}]
    metrics = coco_box_metrics(ground_truth(), shifted)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(0.3)
    wrong_name = [{"image_id": 7, "category_id": 8, "bbox": [10, 10, 40, 40], "score": 0.9}]
    assert coco_box_metrics(ground_truth(), wrong_name)["AP"] == pytest.approx(0.0)
    assert set(coco_box_metrics(ground_truth(), []).values()) == {0.0}  # loadRes refuses an empty list
    with pytest.raises(ValueError, match=r"image ids \[5\]"):
        coco_box_metrics(ground_truth(), [{"image_id": 5, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1}])


# ------------------------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def model(offline_cache):  # noqa: F811
    from uniperceiver import UniPerceiver, tiny_config

    torch.manual_seed(0)
    return UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE}, detection=DETECTION)).eval()


def test_detect_returns_boxes_in_each_pictures_pixels_and_takes_an_lvis_sized_list(model, monkeypatch):
    pictures = [Image.new("RGB", (128, 96), "white"), Image.new("RGB", (50, 70), "black")]
    names = [f"thing {i}" for i in range(1203)]
    calls = []
    original = model._embed_classes  # what encodes a list of names, uncached
    monkeypatch.setattr(model, "_embed_classes", lambda chunk, templates: calls.append(len(chunk)) or
                        original(chunk, templates))
    found = model.detect(pictures, names, score_threshold=0.0, max_detections=7)
    assert calls == [256, 256, 256, 256, 179]  # the names in batches, all in one call
    assert len(found) == 2
    for item, picture in zip(found, pictures):
        assert 0 < len(item) <= 7 and item.boxes.shape == (len(item), 4)
        assert (item.boxes[:, 0] >= 0).all() and (item.boxes[:, 2] <= picture.width + 1e-3).all()
        assert (item.boxes[:, 3] <= picture.height + 1e-3).all()
        assert ((item.labels >= 0) & (item.labels < len(names))).all()
        assert item.scores.tolist() == sorted(item.scores.tolist(), reverse=True)
    model.detect(pictures[:1], names, score_threshold=0.0)
    assert len(calls) == 5  # cached: the same list is not encoded again


def test_a_model_without_the_head_says_so_and_an_export_round_trips(model, tmp_path, offline_cache):  # noqa: F811
    from uniperceiver import UniPerceiver, tiny_config

    plain = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE}))
    with pytest.raises(ValueError, match="no detection head.*config.detection"):
        plain.detect([Image.new("RGB", (64, 64))], ["circle"])
    picture = [Image.new("RGB", (64, 64), "gray")]
    before = model.detect(picture, ["circle", "star"], score_threshold=0.0)[0]
    loaded = UniPerceiver.from_pretrained(model.save_pretrained(tmp_path / "export"))
    after = loaded.detect(picture, ["circle", "star"], score_threshold=0.0)[0]
    assert torch.allclose(before.boxes, after.boxes) and torch.allclose(before.scores, after.scores)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["detection"]["num_proposals"] == 8


def test_another_task_step_gives_the_detection_head_zero_gradients(model):
    """Under ZeRO-3 a parameter without a gradient in a step is updated from an earlier one's."""
    from tasks import get_task

    task = get_task("classification", class_names=["red", "blue"], image_size=64)
    batch = {"images": torch.randn(2, 3, 64, 64), "labels": torch.tensor([0, 1]), "class_names": ["red", "blue"]}
    model.train()
    model.zero_grad(set_to_none=True)
    model(task, batch).backward()
    model.eval()
    head = list(model.region_proposer.named_parameters()) + list(model.region_tokens.named_parameters())
    missing = [name for name, p in head if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(p.grad.abs().max() == 0 for _, p in head)


def test_format_batch_resizes_boxes_with_the_pictures_and_names_bad_categories():
    from tasks import get_task

    task = get_task("detection", category_names=["circle", "star"], image_size=32)
    sample = {"image": Image.new("RGB", (64, 128)), "boxes": [[8, 16, 32, 64]], "categories": ["star"]}
    batch = task.format_batch([sample])
    assert batch["images"].shape == (1, 3, 32, 32) and batch["sizes"] == [(128, 64)]
    assert batch["boxes"][0].tolist() == [[4.0, 4.0, 20.0, 20.0]] and batch["labels"][0].tolist() == [1]
    crowd = task.format_batch([{**sample, "boxes": [[8, 16, 32, 64], [0, 0, 64, 128]],
                                "categories": ["star", "circle"], "iscrowd": [0, 1]}])
    assert crowd["boxes"][0].tolist() == [[4.0, 4.0, 20.0, 20.0]] and crowd["labels"][0].tolist() == [1]
    with pytest.raises(ValueError, match=r"sample 0 has categories \['square'\]"):
        task.format_batch([{**sample, "categories": ["square"]}])
    with pytest.raises(KeyError, match="lacks \\['boxes'\\]"):
        task.format_batch([{"image": sample["image"], "categories": []}])


# ------------------------------------------------------------------------------------------------ learning
def test_a_tiny_model_learns_to_box_and_name_four_pictures(offline_cache):  # noqa: F811
    """150 steps on four shapes pictures: proposals and names both fit (AP50 >= 0.8 by pycocotools)."""
    from data_recipes.formats import open_dataset
    from data_recipes.shapes import ShapesConfig
    from eval.detection import evaluate_shapes_boxes
    from launch.training.data import sample_for_task
    from tasks import get_task
    from tiny_model import overfit
    from uniperceiver import UniPerceiver, tiny_config

    torch.manual_seed(0)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE}, detection=DETECTION))
    config = ShapesConfig(train_size=8, val_size=4, test_size=4)
    dataset = open_dataset("shapes?split=test&train_size=8&val_size=4&test_size=4")
    task = get_task("detection", category_names=list(config.shapes), image_size=64)
    batch = task.format_batch([sample_for_task("detection", dataset[i], 0) for i in range(4)])
    losses = overfit(model, task, batch, steps=150, lr=2e-3)
    assert losses[-1] < 0.5 * losses[0]
    rows = dataset.dataset.data if hasattr(dataset, "dataset") else dataset.data
    metrics = evaluate_shapes_boxes(model, rows.select(range(4)), config)
    assert metrics["detection/AP50"] >= 0.8, metrics
    assert math.isfinite(metrics["detection/AP"])


# ------------------------------------------------------------------------------------------------ the suite
def write_coco_fixture(root: Path) -> Path:
    """Three pictures in COCO's layout: category ids 3 and 8 (not 1 and 2), one picture without annotations,
    no "info" key."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images, annotations = [], []
    for image_id, (name, boxes) in enumerate([("a.jpg", [(3, [10, 10, 30, 30])]),
                                              ("b.jpg", [(8, [40, 20, 20, 30]), (3, [5, 5, 20, 20])]),
                                              ("empty.jpg", [])], start=11):
        picture = Image.new("RGB", (80, 60), (200, 220, 240))
        draw = ImageDraw.Draw(picture)
        for category, (x, y, w, h) in boxes:
            (draw.ellipse if category == 3 else draw.rectangle)([x, y, x + w, y + h], fill=(200, 30, 30))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        picture.save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": 80, "height": 60})
    categories = [{"id": 3, "name": "circle"}, {"id": 8, "name": "square"}]
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_coco_detection_suite_writes_metrics_and_coco_results_with_the_files_ids(model, tmp_path, capsys):
    from eval.__main__ import main

    write_coco_fixture(tmp_path / "coco")
    export = model.save_pretrained(tmp_path / "export")
    out = tmp_path / "det.json"
    results = main(["coco_detection", "--model", str(export), "--data", str(tmp_path / "coco"), "--out", str(out),
                    "--score-threshold", "0.0", "--no-progress", "--workers", "0", "--device", "cpu"])
    assert {"detection/AP", "detection/AP50", "detection/AP75", "detection/APs", "detection/APm",
            "detection/APl", "detection/AR@100"} == set(results["metrics"])
    assert results["counts"]["images"] == 3 and results["counts"]["categories"] == 2
    predictions = json.loads((tmp_path / "det.predictions.json").read_text())
    assert predictions and {p["image_id"] for p in predictions} <= {11, 12, 13}
    assert {p["category_id"] for p in predictions} <= {3, 8}
    assert all(len(p["bbox"]) == 4 and p["bbox"][2] >= 0 for p in predictions)
    assert "| detection/AP50 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--data ROOT"):
        main(["coco_detection", "--model", str(export)])


class GroundTruthDetector:
    """Answers `detect` with the fixture's own boxes, picture by picture in the order asked."""
    has_detection = True

    def __init__(self, dataset):
        self.samples = [dataset[i] for i in range(len(dataset))]

    def detect(self, pictures, categories, score_threshold, max_detections):
        from tasks.detection import coco_to_xyxy
        from uniperceiver.detection import Detections

        found = []
        for _ in pictures:
            sample = self.samples.pop(0)
            boxes = coco_to_xyxy(sample.boxes)
            labels = torch.tensor([categories.index(name) for name in sample.categories], dtype=torch.long)
            found.append(Detections(boxes, torch.ones(len(labels)), labels))
        return found


def test_the_suite_gives_a_ground_truth_detector_ap_1_and_equals_pycocotools_called_directly(model, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from data_recipes.formats import open_dataset
    from eval.detection import evaluate_boxes
    from eval.distributed import EvalWorld

    annotations = write_coco_fixture(tmp_path / "coco")
    dataset = open_dataset(f"coco_instances:{tmp_path / 'coco'}?split=val")
    oracle = evaluate_boxes(GroundTruthDetector(dataset), dataset, EvalWorld(), batch_size=2, progress=False)
    assert oracle["metrics"]["detection/AP"] == pytest.approx(1.0)
    assert oracle["metrics"]["detection/AP50"] == pytest.approx(1.0)
    # the tiny model's detections, scored by the suite and by pycocotools on the annotation file itself
    results = evaluate_boxes(model, dataset, EvalWorld(), batch_size=2, progress=False, score_threshold=0.0)
    ground_truth = COCO(str(annotations))
    ground_truth.dataset.setdefault("info", {})
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(results["predictions"]), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    direct = dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), evaluator.stats[:6]))
    direct["AR@100"] = evaluator.stats[8]
    assert {key: pytest.approx(value) for key, value in direct.items()} == {
        key.split("/")[1]: value for key, value in results["metrics"].items()}


def test_context_regions_join_every_tasks_image_tokens_and_train_with_them(offline_cache, tmp_path):  # noqa: F811
    """With `context_regions` the best proposals' region tokens (plus their scores) follow the image's tokens in
    every task; a classification step trains their RoI projections and not detection's; an export keeps them."""
    from tasks import get_task
    from uniperceiver import UniPerceiver, tiny_config
    from uniperceiver.decoder import Modality

    with pytest.raises(ValueError, match="context_regions"):
        RegionConfig(num_proposals=4, context_regions=5)
    torch.manual_seed(0)
    plain = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE}, detection=DETECTION)).eval()
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                     detection={**DETECTION, "context_regions": 3})).eval()
    images = torch.randn(2, 3, 64, 64)
    tokens, kinds = model.image_tokens(images)
    base_tokens, base_kinds = model.image_encoder(images)
    assert tokens.shape[1] == base_tokens.shape[1] + 3 == plain.image_tokens(images)[0].shape[1] + 3
    assert torch.equal(tokens[:, :-3], base_tokens) and torch.equal(kinds[:, :-3], base_kinds)
    assert (kinds[:, -3:] == int(Modality.REGION)).all()
    _, _, maps = model.image_features(images)
    proposals = model.propose_regions(maps, (64, 64), 3)
    expected = model.context_tokens(maps, proposals.boxes, (64, 64)) + model.context_score(
        (proposals.scores * proposals.valid)[..., None])
    assert torch.allclose(tokens[:, -3:], expected, atol=1e-6)

    task = get_task("classification", class_names=["red", "blue"], image_size=64)
    batch = {"images": images, "labels": torch.tensor([0, 1]), "class_names": ["red", "blue"]}
    model.train()
    model(task, batch).backward()
    model.eval()
    trained = [model.context_tokens.feature_proj.weight, model.context_tokens.box_proj.weight,
               model.context_score.weight]
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trained)
    # the boxes come without gradients, and detection's own region tokens stay detection's
    detection_head = [*model.region_proposer.parameters(), *model.region_tokens.parameters()]
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in detection_head)

    loaded = UniPerceiver.from_pretrained(model.save_pretrained(tmp_path / "export"))
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    assert loaded.config.detection.context_regions == 3


def test_context_regions_run_under_cpu_bf16_autocast(offline_cache):  # noqa: F811
    """Under bfloat16 autocast on a CPU, roi_align gives bf16 features for a float32 buffer: the region tokens
    must still build, for the image tokens and for a training step."""
    from tasks import get_task
    from uniperceiver import UniPerceiver, tiny_config

    torch.manual_seed(0)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                     detection={**DETECTION, "context_regions": 3, "context_names": True})).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        exact, _ = model.image_tokens(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast, _ = model.image_tokens(images)
    assert autocast.shape == exact.shape and torch.isfinite(autocast).all()
    # the patch tokens agree to bf16's precision (the regions may be other proposals where scores nearly tie)
    assert (autocast[:, :-3].float() - exact[:, :-3]).abs().max() < 0.05 * exact[:, :-3].abs().max()
    task = get_task("classification", class_names=["red", "blue"], image_size=64)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(task, {"images": images, "labels": torch.tensor([0, 1]), "class_names": ["red", "blue"]})
    loss.float().backward()
    assert torch.isfinite(model.context_tokens.feature_proj.weight.grad).all()
    assert model.context_tokens.feature_proj.weight.grad.abs().max() > 0


def test_named_context_regions_carry_detections_embedding_of_their_box_without_training_detection(offline_cache):  # noqa: F811
    """With `context_names` each context region's token adds a projection of detection's own embedding of its
    box (the decoder's region embedding, what the category names are ranked against); another task's step
    trains that projection and gives the decoder no gradient through the names (they are found without one)."""
    from tasks import get_task
    from uniperceiver import UniPerceiver, tiny_config

    with pytest.raises(ValueError, match="context_names"):
        RegionConfig(num_proposals=4, context_names=True)
    torch.manual_seed(0)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                     detection={**DETECTION, "context_regions": 3, "context_names": True})).eval()
    images = torch.randn(2, 3, 64, 64)
    tokens, _ = model.image_tokens(images)
    base_tokens, base_kinds, maps = model.image_features(images)
    proposals = model.propose_regions(maps, (64, 64), 3)
    names = model.region_embeddings(base_tokens, base_kinds, maps, proposals.boxes, proposals.valid, (64, 64))
    scores = (proposals.scores * proposals.valid)[..., None]
    expected = (model.context_tokens(maps, proposals.boxes, (64, 64)) + model.context_score(scores)
                + model.context_name(names * scores.gt(0)))
    assert torch.allclose(tokens[:, -3:], expected, atol=1e-6)
    # the names change the tokens: without them the same regions read differently
    assert not torch.allclose(expected, expected - model.context_name(names * scores.gt(0)), atol=1e-3)

    task = get_task("classification", class_names=["red", "blue"], image_size=64)
    batch = {"images": images, "labels": torch.tensor([0, 1]), "class_names": ["red", "blue"]}
    model.train()
    model(task, batch).backward()
    assert model.context_name.weight.grad is not None and model.context_name.weight.grad.abs().max() > 0
    detection_head = [*model.region_proposer.parameters(), *model.region_tokens.parameters()]
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in detection_head)

    # a detection step reads no context regions: the projection gets a zero gradient, not none
    model.zero_grad()
    detection = get_task("detection", category_names=["circle", "square"], image_size=64)
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 24.0]]), torch.tensor([[30.0, 30.0, 50.0, 50.0]])]
    model(detection, {"images": images, "boxes": boxes, "labels": [torch.tensor([0]), torch.tensor([1])],
                      "category_names": ["circle", "square"]}).backward()
    assert model.context_name.weight.grad is None or model.context_name.weight.grad.abs().max() == 0
