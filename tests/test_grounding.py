"""Phrase grounding: the shapes data's phrase labels, the boxes in input pixels, the layer, and VQA's losses."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tiny_model import TINY_BACKBONE, offline_cache  # noqa: F401  (a fixture)
from data_recipes.shapes import phrase_groundings
from tasks import get_task
from tasks.grounding import IGNORE, grounding_loss, input_boxes, pair_targets, phrase_targets
from tasks.vqa import answer_separation
from uniperceiver.grounding import PhraseGrounding, PhraseRelations
from uniperceiver.region_proposals import RegionConfig, box_encoding

DETECTION = {"levels": [1, 2, 3], "width": 32, "depth": 1, "num_proposals": 8, "pre_nms_top_k": 100,
             "context_regions": 3}


def test_phrases_that_name_exactly_one_object_are_grounded():
    kinds = [("red", "star"), ("blue", "square"), ("red", "circle")]

    def spans(question):
        return [(question[start:end], index) for start, end, index in phrase_groundings(question, kinds)]

    assert spans("where is the red star relative to the blue square?") == [("red star", 0), ("blue square", 1)]
    assert spans("is the red circle left of the blue square?") == [("red circle", 2), ("blue square", 1)]
    assert spans("what colour is the square?") == [("square", 1)]
    assert spans("what shape is the blue object?") == [("blue object", 1)]
    assert spans("what shape is the red object?") == []       # two red objects
    assert spans("is there a green star?") == [("green star", -1)]  # none: the "no object" slot
    assert spans("how many red shapes are there?") == []      # a count names no one object
    assert spans("is there an orange diamond?") == [("orange diamond", -1)]


def test_shapes_samples_carry_one_grounding_list_per_question(offline_cache):  # noqa: F811
    from data_recipes.formats.shapes import ShapesSamples

    data = ShapesSamples(split="val", train_size=8, val_size=6, test_size=2)
    for record in data.records:
        sample = data._sample(record)
        groundings = sample.extra["qa_groundings"]
        assert len(groundings) == len(sample.extra["questions"])
        for question, phrases in zip(sample.extra["questions"], groundings):
            for start, end, index in phrases:
                colour_or_shape = question[start:end].split()
                if index == -1:
                    assert question.startswith("is there")
                    continue
                named = sample.categories[index]
                assert named in colour_or_shape or colour_or_shape[-1] == "object"


def test_boxes_follow_the_evaluation_resize_and_centre_crop():
    wide = Image.new("RGB", (128, 64))
    # shorter side 64 -> 64: no scaling; the crop keeps x in [32, 96)
    assert input_boxes(wide, [[40, 10, 20, 20]], 64) == [[8.0, 10.0, 28.0, 30.0]]
    # a box partly outside the crop is clipped to it
    assert input_boxes(wide, [[20, 0, 20, 10]], 64) == [[0.0, 0.0, 8.0, 10.0]]
    square = Image.new("RGB", (32, 32))
    assert input_boxes(square, [[4, 8, 8, 4]], 64) == [[8.0, 16.0, 24.0, 24.0]]
    assert input_boxes(torch.zeros(3, 64, 64), [[4, 8, 8, 4]], 64) == [[4.0, 8.0, 12.0, 12.0]]


def test_phrase_targets_pick_the_last_token_and_the_best_overlapping_region():
    # "is the red star left of it": tokens [bos, is, the, red, star, left, of, it]
    offsets = torch.tensor([[[0, 0], [0, 2], [2, 6], [6, 10], [10, 15], [15, 20], [20, 23], [23, 26]]])
    regions = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0], [21.0, 21.0, 40.0, 40.0]]])
    valid = torch.tensor([[True, True, False]])
    targets = phrase_targets(offsets, [[(7, 15, [21.0, 21.0, 40.0, 40.0])]], regions, valid)
    expected = torch.full((1, 8), IGNORE)
    expected[0, 4] = 1  # region 2 overlaps best but is padding
    assert torch.equal(targets, expected)
    # no region overlaps the object by 0.5: nothing to learn
    far = phrase_targets(offsets, [[(7, 15, [50.0, 50.0, 60.0, 60.0])]], regions, valid)
    assert (far == IGNORE).all()
    # a phrase that names no object in the picture: the "no object" slot, after the 3 regions
    absent = phrase_targets(offsets, [[(7, 15, None)]], regions, valid)
    assert absent[0, 4] == 3 and (absent[0, [0, 1, 2, 3, 5, 6, 7]] == IGNORE).all()
    logits = torch.zeros(1, 8, 4, requires_grad=True)  # three regions and the slot
    loss = grounding_loss(logits, far)
    assert loss.item() == 0 and loss.requires_grad
    # nothing to learn from logits that mask most of their entries (the relations' later tokens): still 0, not NaN
    masked = torch.full((4, 8, 9), torch.finfo(torch.float32).min / 2, requires_grad=True)
    assert grounding_loss(masked, torch.full((4, 8), IGNORE)).item() == 0
    with pytest.raises(ValueError, match="2 questions' groundings for 1 questions"):
        phrase_targets(offsets, [[], []], regions, valid)


def test_grounding_layer_starts_as_the_identity_and_ignores_padding_regions():
    torch.manual_seed(0)
    layer = PhraseGrounding(16, box_frequencies=2)
    text, regions = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 8.0, 16.0, 16.0], [0.0, 0.0, 16.0, 16.0]]).expand(2, 3, 4)
    valid = torch.tensor([[True, True, False], [False, False, False]])
    out, logits, *_ = layer(text, regions, boxes, valid, (16, 16))
    assert torch.equal(out, text)  # the box projection and the "no object" vector start at zero
    assert logits.shape == (2, 5, 4)  # three regions and the slot
    torch.nn.init.normal_(layer.box.weight)
    torch.nn.init.normal_(layer.null_value)
    torch.nn.init.normal_(layer.null_key)
    out, logits, *_ = layer(text, regions, boxes, valid, (16, 16))
    assert torch.isfinite(out).all()
    weights = logits.softmax(-1)
    assert weights[0, :, 2].max() == 0  # padding takes no attention
    expected = (text[0] + layer.box(weights[0, :, :3] @ box_encoding(boxes[0], (16, 16), 2))
                + weights[0, :, 3:] * layer.null_value)
    torch.testing.assert_close(out[0], expected)
    # a picture without regions finds "no object" on every word
    torch.testing.assert_close(weights[1, :, 3], torch.ones(5))
    torch.testing.assert_close(out[1], text[1] + layer.box.bias + layer.null_value)


def test_grounding_with_content_adds_the_attended_regions_tokens():
    torch.manual_seed(0)
    layer = PhraseGrounding(16, box_frequencies=2, content=True)
    text, regions = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 8.0, 16.0, 16.0], [0.0, 0.0, 16.0, 16.0]]).expand(2, 3, 4)
    valid = torch.tensor([[True, True, False], [False, False, False]])
    out, *_ = layer(text, regions, boxes, valid, (16, 16))
    assert torch.equal(out, text)  # the content projection starts at zero too
    for parameter in (layer.box.weight, layer.null_value, layer.null_key, layer.content.weight, layer.content.bias):
        torch.nn.init.normal_(parameter)
    out, logits, *_ = layer(text, regions, boxes, valid, (16, 16))
    weights = logits.softmax(-1)
    expected = (text[0] + layer.box(weights[0, :, :3] @ box_encoding(boxes[0], (16, 16), 2))
                + weights[0, :, 3:] * layer.null_value + layer.content(weights[0, :, :3] @ regions[0]))
    torch.testing.assert_close(out[0], expected)
    # padding regions' tokens never reach the text: a picture without regions gets the projections' biases alone
    torch.testing.assert_close(out[1], text[1] + layer.box.bias + layer.null_value + layer.content.bias)
    with pytest.raises(ValueError, match="ground_content needs ground_text"):
        RegionConfig(context_regions=4, ground_content=True)


def test_answer_separation_is_the_hinge_over_every_pair():
    answers = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    scale = torch.tensor(10.0)
    unit = torch.nn.functional.normalize(answers, dim=-1)
    cos = unit @ unit.T
    expected = sum(10.0 * max(cos[i, j].item() - 0.5, 0.0) for i in range(3) for j in range(3) if i != j) / 3
    assert answer_separation(answers, 0.5, scale).item() == pytest.approx(expected)
    assert answer_separation(torch.eye(3), 0.5, scale).item() == 0


def test_vqa_with_grounding_needs_the_layer_and_trains_it(offline_cache):  # noqa: F811
    from uniperceiver import UniPerceiver, tiny_config

    with pytest.raises(ValueError, match="ground_text needs context_regions"):
        RegionConfig(ground_text=True)
    with pytest.raises(ValueError, match="grounding_weight"):
        get_task("vqa", grounding_weight=-1)
    with pytest.raises(ValueError, match="answer_margin"):
        get_task("vqa", answer_margin=2)
    assert get_task("vqa").reads_boxes({"grounding_weight": 1.0})
    assert not get_task("vqa").reads_boxes({})

    torch.manual_seed(0)
    answers = ["red", "blue", "left of", "right of"]
    task = get_task("vqa", answer_list=answers, grounding_weight=1.0, answer_margin=0.5, image_size=64)
    picture = Image.new("RGB", (64, 64), (255, 255, 255))
    samples = [{"image": picture, "questions": ["where is the red star relative to the blue square?",
                                                "what colour is the star?"],
                "qa_answers": ["left of", "red"], "boxes": [[4, 20, 16, 16], [40, 20, 16, 16]],
                "qa_groundings": [[[13, 21, 0], [38, 49, 1]], [[19, 23, 0]]]}]
    batch = task.format_batch(samples)
    assert batch["groundings"][0] == [(13, 21, [4.0, 20.0, 20.0, 36.0]), (38, 49, [40.0, 20.0, 56.0, 36.0])]
    with pytest.raises(KeyError, match="qa_groundings"):
        task.format_batch([{k: v for k, v in samples[0].items() if k != "qa_groundings"}])
    bad = [{**samples[0], "qa_groundings": [[[13, 21, 5]], []]}]
    with pytest.raises(ValueError, match=r"not \[start, end, box index\] .* into its 2 boxes"):
        task.format_batch(bad)
    with pytest.raises(ValueError, match=r"not \[start, end, box index\] with 0 <= start < end <= 50"):
        task.format_batch([{**samples[0], "qa_groundings": [[[30, 10, 0]], []]}])
    with pytest.raises(ValueError, match="one list of phrases per question"):
        task.format_batch([{**samples[0], "qa_groundings": [[13, 21, 0]]}])
    with pytest.raises(ValueError, match="'boxes' must be COCO"):
        task.format_batch([{**samples[0], "boxes": [[4, 20, 16]]}])

    plain = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE}, detection=DETECTION))
    with pytest.raises(ValueError, match="ground_text"):
        task.loss(plain, batch)

    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                     detection={**DETECTION, "ground_text": True}))
    model.eval()
    with torch.no_grad():  # the new layer changes nothing until its box projection has trained
        query, grounding = model.vqa_query_and_grounding(batch["images"], batch["questions"], batch["image_index"])
        torch.testing.assert_close(query, plain_query(model, batch))
    assert grounding.logits.shape[:2] == (2, model.text_encoder.tokenize(batch["questions"])["input_ids"].shape[1])
    # give the proposer two boxes on the objects, so that the phrases have regions to attend to
    model.propose_regions = lambda maps, size, count=None: fixed_proposals(count or 3)
    model.train()
    loss = model(task, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.grounding.query.weight.grad.abs().max() > 0 and model.grounding.box.weight.grad.abs().max() > 0
    # one question per sample (a validation split) carries no phrases: the answers' loss alone, no error
    single = task.format_batch([{"image": picture, "question": "what colour is the star?", "answer": "red"}])
    assert "groundings" not in single and torch.isfinite(task.loss(model, single))

    # the answer margin is a training term: in eval mode (a validation loss) it is left out
    without_margin = get_task("vqa", answer_list=answers, grounding_weight=1.0, image_size=64)

    def loss_of(one_task):
        torch.manual_seed(0)
        return one_task.loss(model, batch).item()

    with torch.no_grad():
        model.eval()
        assert loss_of(task) == pytest.approx(loss_of(without_margin), rel=1e-6)
        model.train()
        hinge = answer_separation(model.encode_text(answers), 0.5, model.readout.scale("vqa")).item()
        assert hinge > 0 and loss_of(task) - loss_of(without_margin) == pytest.approx(hinge, rel=1e-4)

    # under ZeRO-3 a step that ranks no answers (another task, or VQA by generation) still gives the layer a
    # (zero) gradient; a ranking VQA step runs the layer itself
    import uniperceiver.model as model_module
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(model_module, "zero3_partitioned", lambda parameters: True)
    try:
        calls = []
        idle = model._idle_grounding_term
        model._idle_grounding_term = lambda like: calls.append(1) or idle(like)
        generate = get_task("vqa", mode="generate", image_size=64)
        model.zero_grad()
        model(generate, generate.format_batch([{"image": picture, "question": "what colour is the star?",
                                               "answer": "red"}])).backward()
        assert calls == [1]
        assert all(p.grad is not None and p.grad.abs().max() == 0 for p in model.grounding.parameters())
        model(task, batch)
        assert calls == [1]
    finally:
        monkeypatch.undo()
        del model._idle_grounding_term

    # a few steps on the grounding layer alone lower the grounding loss
    optimizer = torch.optim.Adam(model.grounding.parameters(), lr=3e-2)
    # the offsets the model returns are those of the tokens it encoded, as the text encoder gives them alone
    _, found = model.vqa_query_and_grounding(batch["images"], batch["questions"], batch["image_index"])
    assert torch.equal(found.offsets, model.text_encoder.token_offsets(batch["questions"]))
    assert found.offsets.shape[:2] == found.logits.shape[:2]

    def grounding_only():
        _, found = model.vqa_query_and_grounding(batch["images"], batch["questions"], batch["image_index"])
        return grounding_loss(found.logits, phrase_targets(found.offsets, batch["groundings"], found.boxes,
                                                           found.valid))

    first = grounding_only().item()
    for _ in range(15):
        optimizer.zero_grad()
        grounding_only().backward()
        optimizer.step()
    assert grounding_only().item() < 0.5 * first


def plain_query(model, batch):
    """The query with the grounding layer taken out."""
    layer, model.grounding = model.grounding, None
    try:
        return model.vqa_query(batch["images"], batch["questions"], image_index=batch["image_index"])
    finally:
        model.grounding = layer


def fixed_proposals(count):
    from uniperceiver.region_proposals import Proposals

    boxes = torch.tensor([[40.0, 20.0, 56.0, 36.0], [4.0, 20.0, 20.0, 36.0], [0.0, 0.0, 64.0, 64.0]])[:count]
    return Proposals(boxes[None], torch.tensor([[0.9, 0.8, 0.0]])[:, :count],
                     torch.tensor([[True, True, False]])[:, :count])


def test_the_shapes_suite_scores_the_grounding_of_a_grounded_model(tmp_path, offline_cache):  # noqa: F811
    """`vqa/grounding_accuracy`: a phrase counts as right when its last token attends most to the region on its
    object. Regions placed on the objects, in the objects' order: attention on the named object's index is
    always right, on the next object's never; an untrained grounded model gets the metric beside its chance."""
    from data_recipes.shapes import ShapesConfig, build_shapes_dataset
    from eval.shapes import _grounding_hits, _question_objects, evaluate_shapes
    from tasks.grounding import input_boxes
    from uniperceiver import UniPerceiver, tiny_config
    from uniperceiver.grounding import QuestionGrounding

    config = ShapesConfig(train_size=8, val_size=1, test_size=6)
    rows = build_shapes_dataset(tmp_path / "shapes", config)["test"]
    torch.manual_seed(0)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                     detection={**DETECTION, "context_regions": 4, "num_proposals": 8,
                                                "ground_text": True})).eval()
    picked, questions, named = [], [], []  # named: each grounded phrase's object (-1: none there)
    for index, row in enumerate(rows):
        kinds = [(config.colours[c], config.shapes[k]) for c, k in zip(row["objects"]["colour"],
                                                                       row["objects"]["category"])]
        for question in row["questions"]:
            picked.append(index), questions.append(question)
            named.append([i for _, _, i in phrase_groundings(question, kinds)])
    boxes = torch.zeros(len(questions), 4, 4)
    valid = torch.zeros(len(questions), 4, dtype=torch.bool)
    for q, index in enumerate(picked):
        objects = rows[index]["objects"]["bbox"]
        boxes[q, :len(objects)] = torch.tensor(input_boxes(rows[index]["image"], objects, 64))
        valid[q, :len(objects)] = True
    count = valid.sum(1)
    # every token attends to what the question's one grounded phrase names: its object, or the slot (index 4);
    # shifted, to the next object, or to the first region instead of the slot
    wanted = torch.tensor([(names[0] if names[0] >= 0 else 4) if len(names) == 1 else 0 for names in named])
    assert (wanted == 4).any() and (wanted < 4).any()
    for shift, expected_right in ((0, True), (1, False)):
        single = [q for q, names in enumerate(named)
                  if len(names) == 1 and (count[q] > 1 or names[0] == -1 or expected_right)]
        subset, asked = torch.tensor(single), [questions[q] for q in single]
        offsets = model.text_encoder.token_offsets(asked)
        length = offsets.shape[1]
        target = wanted[subset]
        if shift:
            target = torch.where(target == 4, 0, (target + 1) % count[subset])
        logits = torch.nn.functional.one_hot(target, 5).float()[:, None, :].expand(-1, length, -1) * 10
        hits = _grounding_hits(_question_objects(rows.select([picked[q] for q in single]), 64), asked,
                               QuestionGrounding(logits, boxes[subset], valid[subset], offsets))
        absent = sum(named[q][0] == -1 for q in single)
        assert hits["no_object"][1] == absent > 0 and hits["object"][1] == len(single) - absent > 0
        for right, total in hits.values():
            assert right == (total if expected_right else 0)

    results = evaluate_shapes(model, dataset={"train": rows, "test": rows}, config=config, tasks=("vqa",),
                              progress=False)
    # every phrase that names no object is scored (the slot needs no proposal); the untrained proposer may find
    # no object's region, whose phrases are then not scored
    assert results["counts"]["grounded_phrases_without_object"] == sum(names.count(-1) for names in named) > 0
    metrics, chance = results["metrics"], results["chance"]
    assert 0 <= metrics["vqa/grounding_accuracy[no_object]"] <= 1 and chance["vqa/grounding_accuracy"] == 0.2
    scored = results["counts"]["grounded_phrases"]
    assert scored >= results["counts"]["grounded_phrases_without_object"]
    assert ("vqa/grounding_accuracy[object]" in metrics) == (scored > sum(names.count(-1) for names in named))


def test_relations_take_in_the_offset_to_the_paired_earlier_token():
    torch.manual_seed(0)
    layer = PhraseRelations(8)
    text, valid = torch.randn(2, 4, 8), torch.tensor([[True, True, True, False], [True, True, True, True]])
    attention = torch.rand(2, 4, 3) / 3  # each token's attention over 3 regions (the rest is the slot's)
    places = torch.rand(2, 3, 4) * 0.5 + 0.1
    out, logits = layer(text, valid, attention, places)
    assert torch.equal(out, torch.zeros_like(out))  # the output layer starts at zero
    weights = logits.softmax(-1)
    assert weights.shape == (2, 4, 5)
    later = torch.ones(4, 4, dtype=torch.bool).triu()  # itself and the later tokens
    assert weights[:, :, :4][later.expand(2, 4, 4)].max() == 0 and weights[0, :, 3].max() == 0  # nor padding
    torch.nn.init.normal_(layer.out.weight)
    out, logits = layer(text, valid, attention, places)
    weights = logits.softmax(-1)
    expected = torch.zeros(2, 4, 5)
    for q in range(2):
        mass = attention[q].sum(-1)
        place = attention[q] @ places[q] / mass[:, None]
        for i in range(4):
            for j in range(4):
                pair = torch.cat([4 * (place[i, :2] - place[j, :2]), place[i, 2:].log() - place[j, 2:].log(),
                                  torch.ones(1)]) * (mass[i] * mass[j])
                expected[q, i] += weights[q, i, j] * pair
    torch.testing.assert_close(out, layer.out(torch.nn.functional.gelu(layer.hidden(expected))))


def test_pair_targets_pair_each_phrase_with_the_one_before():
    # regions 0..2, slot 3: tokens 2 and 5 name found objects, token 4 names none, token 6 an unfound one
    region_targets = torch.full((2, 8), IGNORE)
    region_targets[0, 2], region_targets[0, 4], region_targets[0, 5] = 1, 3, 0
    region_targets[1, 6] = 2
    expected = torch.full((2, 8), IGNORE)
    expected[0, 2], expected[0, 5], expected[1, 6] = 8, 2, 8  # 8: the "none" slot after the 8 tokens
    assert torch.equal(pair_targets(region_targets, 3), expected)


def test_vqa_with_relations_trains_the_pairing(offline_cache):  # noqa: F811
    from uniperceiver import UniPerceiver, tiny_config

    torch.manual_seed(0)
    task = get_task("vqa", answer_list=["red", "left of", "right of"], grounding_weight=1.0, image_size=64)
    picture = Image.new("RGB", (64, 64), (255, 255, 255))
    batch = task.format_batch([{"image": picture, "questions": ["where is the red star relative to the blue square?",
                                                                "what colour is the star?"],
                                "qa_answers": ["left of", "red"], "boxes": [[4, 20, 16, 16], [40, 20, 16, 16]],
                                "qa_groundings": [[[13, 21, 0], [38, 49, 1]], [[19, 23, 0]]]}])
    with pytest.raises(ValueError, match="ground_relations needs ground_text"):
        RegionConfig(context_regions=4, ground_relations=True)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                     detection={**DETECTION, "ground_text": True, "ground_relations": True}))
    model.propose_regions = lambda maps, size, count=None: fixed_proposals(count or 3)
    model.eval()
    with torch.no_grad():  # the relations start at zero too: the same query as without any grounding
        query, grounding = model.vqa_query_and_grounding(batch["images"], batch["questions"], batch["image_index"])
        torch.testing.assert_close(query, plain_query(model, batch))
    length = grounding.offsets.shape[1]
    assert grounding.pairs.shape == (2, length, length + 1)
    phrase = phrase_targets(grounding.offsets, batch["groundings"], grounding.boxes, grounding.valid)
    pairs = pair_targets(phrase, grounding.boxes.shape[1])
    star, square = (phrase[0] != IGNORE).nonzero(as_tuple=True)[0].tolist()
    assert pairs[0, star] == length and pairs[0, square] == star  # the square pairs with the star
    model.train()
    model(task, batch).backward()
    relations = model.grounding.relations
    assert relations.query.weight.grad.abs().max() > 0 and relations.out.weight.grad.abs().max() > 0
