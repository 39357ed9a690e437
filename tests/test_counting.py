"""Counting and relation words in the grounding layer: the shapes data's counting phrases, their region targets,
`PhraseCounts`, `PhraseRelations(words=True)`, and VQA's count loss."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from test_grounding import DETECTION, fixed_proposals
from tiny_model import TINY_BACKBONE, offline_cache  # noqa: F401  (a fixture)
from data_recipes.shapes import count_groundings
from tasks import get_task
from tasks.grounding import count_loss, count_targets
from uniperceiver.grounding import PhraseCounts, PhraseRelations
from uniperceiver.region_proposals import RegionConfig


def test_counting_phrases_name_every_object_they_count():
    kinds = [("red", "star"), ("blue", "star"), ("red", "circle")]

    def spans(question):
        return [(question[start:end], named) for start, end, named in count_groundings(question, kinds)]

    assert spans("how many shapes are there?") == [("shapes", [0, 1, 2])]
    assert spans("how many stars are there?") == [("stars", [0, 1])]
    assert spans("how many red shapes are there?") == [("red shapes", [0, 2])]
    assert spans("how many green shapes are there?") == [("green shapes", [])]
    assert spans("how many diamonds are there?") == [("diamonds", [])]
    assert spans("what colour is the star?") == []
    assert spans("is there a red star?") == []


def test_shapes_samples_carry_the_counting_phrases(offline_cache):  # noqa: F811
    from data_recipes.formats.shapes import ShapesSamples

    data = ShapesSamples(split="val", train_size=8, val_size=6, test_size=2)
    counted = 0
    for record in data.records:
        sample = data._sample(record)
        phrases = sample.extra["qa_count_groundings"]
        assert len(phrases) == len(sample.extra["questions"])
        for question, answer, found in zip(sample.extra["questions"], sample.extra["qa_answers"], phrases):
            assert len(found) == int(question.startswith("how many"))
            for start, end, named in found:
                counted += 1
                # the objects named are as many as the answer says
                assert ["zero", "one", "two", "three", "four"][len(named)] == answer
    assert counted >= 6


def test_count_targets_claim_one_region_per_object_and_ignore_padding():
    # "how many red shapes": tokens [bos, how, many, red, shapes]
    offsets = torch.tensor([[[0, 0], [0, 3], [3, 8], [8, 12], [12, 19]]]).expand(2, 5, 2)
    regions = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0], [21.0, 21.0, 40.0, 40.0],
                            [50.0, 50.0, 60.0, 60.0]]).expand(2, 4, 4)
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    counted = [[(9, 19, [[0.0, 0.0, 10.0, 10.0], [21.0, 21.0, 40.0, 40.0], [50.0, 50.0, 60.0, 60.0]])],
               [(9, 19, [])]]
    targets = count_targets(offsets, counted, regions, valid)
    expected = torch.full((2, 5, 4), -1.0)
    # region 0 and region 2 (the best of the two overlapping ones) are claimed; the third object's only
    # overlapping region is padding, so it claims none
    expected[0, 4] = torch.tensor([1.0, 0.0, 1.0, -1.0])
    expected[1, 4] = torch.tensor([0.0, 0.0, -1.0, -1.0])  # counts nothing: every valid region 0
    assert torch.equal(targets, expected)
    logits = torch.zeros(2, 5, 4, requires_grad=True)
    loss = count_loss(logits, targets)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # five entries, each at p = 0.5
    loss.backward()
    assert logits.grad[targets < 0].abs().max() == 0 and logits.grad[targets >= 0].abs().min() > 0
    nothing = count_loss(torch.full((1, 5, 4), torch.finfo(torch.float32).min / 2, requires_grad=True),
                         torch.full((1, 5, 4), -1.0))
    assert nothing.item() == 0 and nothing.requires_grad
    with pytest.raises(ValueError, match="1 questions' counting phrases for 2 questions"):
        count_targets(offsets, counted[:1], regions, valid)


def test_counts_add_the_sum_of_the_matches_as_a_hat_over_the_numbers():
    torch.manual_seed(0)
    layer = PhraseCounts(8, dim=4, max_count=3)
    text, regions = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    valid = torch.tensor([[True, True, False], [False, False, False]])
    out, logits = layer(text, regions, valid)
    assert torch.equal(out, torch.zeros_like(out))  # the output layer starts at zero
    assert logits.shape == (2, 5, 3) and logits.sigmoid()[0, :, 2].max() == 0 and logits.sigmoid()[1].max() == 0
    torch.nn.init.normal_(layer.value.weight)
    out, logits = layer(text, regions, valid)
    count = logits.sigmoid().sum(-1)
    expected = torch.zeros(2, 5, 4)
    for q in range(2):
        for i in range(5):
            for n in range(4):
                expected[q, i, n] = max(0.0, 1 - abs(count[q, i].item() - n))
    torch.testing.assert_close(out, layer.value(expected))
    torch.testing.assert_close(out[1], layer.value(torch.tensor([1.0, 0.0, 0.0, 0.0])).expand(5, 8))  # zero regions


def test_relation_words_project_the_offset_on_directions_the_token_reads():
    torch.manual_seed(0)
    plain, worded = PhraseRelations(8), PhraseRelations(8, words=True)
    state = plain.state_dict()
    worded.load_state_dict({k: v for k, v in state.items() if k != "hidden.weight"}, strict=False)
    with torch.no_grad():
        worded.hidden.weight.zero_()
        worded.hidden.weight[:, :plain.features] = plain.hidden.weight
        torch.nn.init.normal_(plain.out.weight)
        worded.out.weight.copy_(plain.out.weight)
    text, valid = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    attention, places = torch.rand(2, 4, 3) / 3, torch.rand(2, 3, 4) * 0.5 + 0.1
    # with the directions' weights at zero in the hidden layer, the same output as without them
    torch.testing.assert_close(worded(text, valid, attention, places)[0], plain(text, valid, attention, places)[0])
    # a direction's feature is the paired offset's projection on it
    captured = {}
    worded.hidden.register_forward_hook(lambda module, args, out: captured.update(features=args[0]))
    worded(text, valid, attention, places)
    features = captured["features"]
    directions = worded.direction(text).view(2, 4, worded.directions, 2)
    torch.testing.assert_close(features[..., plain.features:], (directions * features[..., None, :2]).sum(-1))
    mirrored = places.clone()
    mirrored[..., 0] = 1 - mirrored[..., 0]
    worded(text, valid, attention, mirrored)
    # mirrored left to right, dx changes sign and dy does not, and each projection follows: "left of" reads the
    # other side
    flipped = features[..., :2] * torch.tensor([-1.0, 1.0])
    torch.testing.assert_close(captured["features"][..., :2], flipped)
    torch.testing.assert_close(captured["features"][..., plain.features:], (directions * flipped[..., None, :]).sum(-1))
    assert not torch.allclose(captured["features"][..., plain.features:], features[..., plain.features:])
    with pytest.raises(ValueError, match="ground_relation_words needs ground_relations"):
        RegionConfig(context_regions=4, ground_text=True, ground_relation_words=True)
    with pytest.raises(ValueError, match="ground_counts needs ground_text"):
        RegionConfig(context_regions=4, ground_counts=True)


def test_vqa_count_loss_trains_the_matches(offline_cache):  # noqa: F811
    from uniperceiver import UniPerceiver, tiny_config

    with pytest.raises(ValueError, match="count_weight needs grounding_weight"):
        get_task("vqa", count_weight=1.0)
    with pytest.raises(ValueError, match="count_weight"):
        get_task("vqa", grounding_weight=1.0, count_weight=-1)
    torch.manual_seed(0)
    task = get_task("vqa", answer_list=["zero", "one", "two"], grounding_weight=1.0, count_weight=1.0,
                    image_size=64)
    picture = Image.new("RGB", (64, 64), (255, 255, 255))
    sample = {"image": picture, "questions": ["how many red shapes are there?", "how many stars are there?"],
              "qa_answers": ["two", "zero"], "boxes": [[4, 20, 16, 16], [40, 20, 16, 16]],
              "qa_groundings": [[], []], "qa_count_groundings": [[[9, 19, [0, 1]]], [[9, 14, []]]]}
    batch = task.format_batch([sample])
    assert batch["count_groundings"] == [[(9, 19, [[4.0, 20.0, 20.0, 36.0], [40.0, 20.0, 56.0, 36.0]])],
                                         [(9, 14, [])]]
    with pytest.raises(KeyError, match="qa_count_groundings"):
        task.format_batch([{k: v for k, v in sample.items() if k != "qa_count_groundings"}])
    with pytest.raises(ValueError, match=r"not \[start, end, \[box indices\]\] .* into its 2 boxes"):
        task.format_batch([{**sample, "qa_count_groundings": [[[9, 19, [0, 2]]], []]}])
    with pytest.raises(ValueError, match="one list of counting phrases per question"):
        task.format_batch([{**sample, "qa_count_groundings": [[9, 19, [0]]]}])

    uncounted = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                         detection={**DETECTION, "ground_text": True}))
    with pytest.raises(ValueError, match="ground_counts"):
        task.loss(uncounted, batch)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                     detection={**DETECTION, "ground_text": True, "ground_counts": True}))
    model.propose_regions = lambda maps, size, count=None: fixed_proposals(count or 3)
    model.train()
    model(task, batch).backward()
    counts = model.grounding.counts
    assert counts.query.weight.grad.abs().max() > 0 and counts.value.weight.grad.abs().max() > 0

    def count_only():
        _, found = model.vqa_query_and_grounding(batch["images"], batch["questions"], batch["image_index"])
        return count_loss(found.counts, count_targets(found.offsets, batch["count_groundings"], found.boxes,
                                                      found.valid))

    optimizer = torch.optim.Adam(counts.parameters(), lr=3e-2)
    first = count_only().item()
    for _ in range(15):
        optimizer.zero_grad()
        count_only().backward()
        optimizer.step()
    assert count_only().item() < 0.5 * first
    with torch.no_grad():  # the red shapes' phrase now matches the two objects' regions, the stars' none
        _, found = model.vqa_query_and_grounding(batch["images"], batch["questions"], batch["image_index"])
        sums = found.counts.sigmoid().sum(-1)
        last = [int(found.offsets[q, :, 1].tolist().index(end)) for q, end in ((0, 19), (1, 14))]
        assert sums[0, last[0]] > 1.5 and sums[1, last[1]] < 0.5


def test_the_shapes_suite_scores_how_many_regions_a_counting_phrase_matches(tmp_path, offline_cache):  # noqa: F811
    from data_recipes.shapes import ShapesConfig, build_shapes_dataset
    from eval.shapes import _count_hits, _question_objects, evaluate_shapes
    from tasks.grounding import input_boxes
    from uniperceiver import UniPerceiver, tiny_config
    from uniperceiver.grounding import QuestionGrounding

    config = ShapesConfig(train_size=8, val_size=1, test_size=6)
    rows = build_shapes_dataset(tmp_path / "shapes", config)["test"]
    torch.manual_seed(0)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                     detection={**DETECTION, "context_regions": 4, "num_proposals": 8,
                                                "ground_text": True, "ground_counts": True})).eval()
    picked, questions, named = [], [], []  # named: the objects each counting question's phrase counts
    for index, row in enumerate(rows):
        kinds = [(config.colours[c], config.shapes[k]) for c, k in zip(row["objects"]["colour"],
                                                                       row["objects"]["category"])]
        for question in row["questions"]:
            if question.startswith("how many"):
                picked.append(index), questions.append(question)
                named.append(count_groundings(question, kinds)[0][2])
    # the regions are the objects' own boxes, in the objects' order
    boxes, valid = torch.zeros(len(questions), 4, 4), torch.zeros(len(questions), 4, dtype=torch.bool)
    for q, index in enumerate(picked):
        objects = rows[index]["objects"]["bbox"]
        boxes[q, :len(objects)] = torch.tensor(input_boxes(rows[index]["image"], objects, 64))
        valid[q, :len(objects)] = True
    offsets = model.text_encoder.token_offsets(questions)
    length = offsets.shape[1]
    right_regions = torch.zeros(len(questions), 4)
    for q, objects in enumerate(named):
        right_regions[q, objects] = 1.0
    objects = _question_objects(rows.select(picked), 64)
    for matched, expected in ((right_regions, len(questions)),  # the named objects' regions: every phrase right
                              (valid.float(), sum(len(objects) == int(valid[q].sum())  # every region: only
                                                  for q, objects in enumerate(named)))):  # "how many shapes"
        counts = (matched * 20 - 10)[:, None, :].expand(-1, length, -1)
        grounding = QuestionGrounding(torch.zeros(len(questions), length, 5), boxes, valid, offsets, counts=counts)
        assert _count_hits(objects, questions, grounding) == (expected, len(questions))
    assert 0 < sum(len(objects) == int(valid[q].sum()) for q, objects in enumerate(named)) < len(questions)

    results = evaluate_shapes(model, dataset={"train": rows, "test": rows}, config=config, tasks=("vqa",),
                              progress=False)
    # every counting phrase is scored where the picture has proposals (the untrained proposer gives them here)
    assert results["counts"]["counting_phrases"] == len(questions)
    assert 0 <= results["metrics"]["vqa/count_match_accuracy"] <= 1
    assert results["chance"]["vqa/count_match_accuracy"] == 0.2
