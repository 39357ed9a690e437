"""launch/pictures.py: the examples.png grid of a run: a valid PNG laid out as a grid, drawn from what the model
says (its captions and answers, right ones green, wrong ones red), written without disturbing the model's mode;
and write_run_examples finds the test split of the shapes data a recipe trains on."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from launch import pictures, pretraining
from launch.pictures import MARGIN, draw_examples_grid, write_examples_grid, write_run_examples

from tiny_model import TINY_BACKBONE

SIZES = dict(train_size=8, val_size=4, test_size=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("INTERN25_CACHE_DIR", str(folder))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield folder


@pytest.fixture(scope="module")
def shapes(cache, tmp_path_factory):
    from data_recipes.shapes import ShapesConfig, answer_list, build_shapes_dataset

    folder = tmp_path_factory.mktemp("shapes") / "data"
    config = ShapesConfig(**SIZES)
    return SimpleNamespace(folder=folder, rows=build_shapes_dataset(folder, config)["test"],
                           answers=answer_list(config))


@pytest.fixture(scope="module")
def model(cache):
    from uniperceiver import UniPerceiver, tiny_config

    torch.manual_seed(0)
    return UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE}))


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def fake(monkeypatch, model, caption: str, answers=None):
    """The model's caption is `caption` for every picture; its answers, in order, are `answers` (None: its own)."""
    monkeypatch.setattr(model, "caption", lambda images, **kw: [caption] * len(images))
    if answers is not None:
        monkeypatch.setattr(model, "answer", lambda images, questions, candidates, **kw: answers[:len(questions)])


def test_grid_is_a_png_laid_out_by_count_and_the_mode_is_restored(model, shapes, tmp_path, monkeypatch):
    seen = []  # the model's mode and autograd at each call: eval, no_grad (the real model runs further below)

    def caption(images, **kw):
        seen.append((model.training, torch.is_grad_enabled()))
        return ["a red circle"] * len(images)

    monkeypatch.setattr(model, "caption", caption)
    monkeypatch.setattr(model, "answer", lambda images, questions, answers, **kw: [answers[0]] * len(questions))
    model.train()
    one = pixels(write_examples_grid(model, shapes.rows, tmp_path / "one.png", shapes.answers, count=1, columns=2))
    assert model.training  # put back as it came: train
    model.eval()
    two = pixels(write_examples_grid(model, shapes.rows, tmp_path / "two.png", shapes.answers, count=2, columns=2))
    assert not model.training
    four = pixels(write_examples_grid(model, shapes.rows, tmp_path / "four.png", shapes.answers, count=4,
                                      columns=2))
    assert not list(tmp_path.glob(".*.tmp-*"))  # written by a rename, nothing left behind
    (h1, w1, _), (h2, w2, _), (h4, w4, _) = one.shape, two.shape, four.shape
    cell_w, cell_h = w1 - 2 * MARGIN, h1 - 2 * MARGIN
    assert cell_w >= 64 * 3 and cell_h > 64 * 3  # the picture, enlarged 3x, and text below it
    assert (h2, w2) == (h1, MARGIN + 2 * (cell_w + MARGIN))   # a second column
    assert (h4, w4) == (MARGIN + 2 * (cell_h + MARGIN), w2)   # then a second row
    # More pictures than the split has: all of them. The picture is there, enlarged by nearest neighbour.
    again = pixels(write_examples_grid(model, shapes.rows, tmp_path / "all.png", shapes.answers, count=99,
                                       columns=2))
    assert again.shape == four.shape
    assert seen and set(seen) == {(False, False)}
    picture = np.asarray(shapes.rows[0]["image"].convert("RGB"))
    x = MARGIN + (cell_w - 64 * 3) // 2
    y = MARGIN + pictures.PADDING
    np.testing.assert_array_equal(one[y:y + 192:3, x:x + 192:3], picture)


def test_texts_come_from_the_model_and_wrong_answers_are_red(model, shapes, tmp_path, monkeypatch):
    drawn = []
    original = ImageDraw.ImageDraw.text

    def text(self, xy, line, *args, **kwargs):  # records what is drawn, in which colour
        drawn.append((line, kwargs.get("fill")))
        return original(self, xy, line, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    asked = [pair for i in range(2) for pair in pictures._pick_questions(  # what the grid asks, in order
        shapes.rows[i]["questions"], shapes.rows[i]["answers"], shapes.rows[i]["qa_types"], 2)]
    assert len(asked) == 4
    true_answers = [a for _, a in asked]
    fake(monkeypatch, model, "a zebra", answers=true_answers)
    right = pixels(write_examples_grid(model, shapes.rows, tmp_path / "right.png", shapes.answers, count=2,
                                       questions_per_image=2))
    said = " ".join(line for line, _ in drawn)  # lines wrap at spaces: joined, they give the texts back
    assert [line for line, _ in drawn].count("pred: a zebra") == 2
    # The true captions (long ones are cut to two lines), and every question with its two answers.
    assert all(f"true: {shapes.rows[i]['captions'][0][:20]}" in said for i in range(2))
    assert all(f"{q} -> {a} (true: {a})" in said for q, a in asked)
    assert {fill for _, fill in drawn if fill in (pictures.RIGHT, pictures.WRONG)} == {pictures.RIGHT}

    drawn.clear()
    wrong_answers = ["purple" if a != "purple" else "red" for a in true_answers]
    fake(monkeypatch, model, "a yak", answers=wrong_answers)
    wrong = pixels(write_examples_grid(model, shapes.rows, tmp_path / "wrong.png", shapes.answers, count=2,
                                       questions_per_image=2))
    said = " ".join(line for line, _ in drawn)
    assert [line for line, _ in drawn].count("pred: a yak") == 2
    assert all(f"{q} -> {w} (true: {a})" in said for (q, a), w in zip(asked, wrong_answers))
    assert {fill for _, fill in drawn if fill in (pictures.RIGHT, pictures.WRONG)} == {pictures.WRONG}
    assert right.shape == wrong.shape and (right != wrong).any()  # other texts, other pixels

    def reddish(image):  # red pixels in the text, below the pictures (which may show red shapes)
        text = image[MARGIN + 2 * pictures.PADDING + 64 * 3:]
        return int(((text[..., 0] > 150) & (text[..., 1] < 80) & (text[..., 2] < 80)).sum())
    assert reddish(right) == 0 and reddish(wrong) > 50


def test_long_texts_are_wrapped_and_cut_to_the_cell():
    picture = Image.new("RGB", (64, 64), (10, 20, 30))
    example = pictures.Example(picture, "word " * 200, "a red circle", ["a red circle"],
                               [("is there a " + "very " * 50 + "long question?", "yes", "no")])
    short = pictures.Example(picture, "a red circle", "a red circle", ["a red circle"], [("is it red?", "yes", "no")])
    long_grid, short_grid = draw_examples_grid([example]), draw_examples_grid([short])
    assert long_grid.size == short_grid.size  # the size does not depend on what the model said
    draw, font = ImageDraw.Draw(long_grid), pictures.default_font()
    lines = pictures._wrap(draw, "word " * 200, font, 100)
    assert len(lines) == pictures.MAX_LINES and lines[-1].endswith("...")
    assert all(draw.textlength(line, font=font) <= 100 for line in lines)
    assert all(draw.textlength(line, font=font) <= 100 for line in pictures._wrap(draw, "x" * 300, font, 100))
    assert pictures._wrap(draw, "a \u2581red \u2026 circle", font, 500) == ["a ?red ... circle"]  # Latin-1 only


def test_write_run_examples_opens_the_test_split_the_recipe_trains_on(model, shapes, tmp_path, capsys):
    from launch.training.recipe import load_recipe

    export = model.save_pretrained(tmp_path / "export")
    spec = f"shapes:{shapes.folder}?split=train&" + "&".join(f"{k}={v}" for k, v in SIZES.items())
    overrides = [f"tasks.{name}.dataset={spec}" + ("&task=vqa" if name == "vqa" else "")
                 for name in ("retrieval", "classification", "captioning", "vqa")]
    recipe = load_recipe("tiny", overrides + ["model.image.backbone_overrides.dcn_backend=reference"])
    assert pretraining.shapes_test_spec(recipe) == (f"shapes:{shapes.folder}?"
                                                 + "&".join(f"{k}={v}" for k, v in SIZES.items()))
    path = write_run_examples(recipe, export, tmp_path / "run", count=2, columns=2)  # the real model, loaded
    assert path == tmp_path / "run" / "examples.png" and pixels(path).shape[1] > 2 * 64 * 3

    none = SimpleNamespace(tasks=[SimpleNamespace(dataset="coco:/nowhere?split=train")])
    assert write_run_examples(none, export, tmp_path / "other") is None
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "other").exists()


def test_detected_boxes_are_drawn_on_the_pictures_with_their_names(shapes, tmp_path, monkeypatch):
    from uniperceiver import UniPerceiver, tiny_config
    from uniperceiver.detection import Detections

    detector = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                        detection={"levels": [1, 2, 3], "width": 16, "depth": 1}))
    fake(monkeypatch, detector, "a zebra")
    asked, drawn = [], []

    def detect(shown, categories, score_threshold):
        asked.append((len(shown), list(categories), score_threshold))
        return [Detections(torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.tensor([0.9]), torch.tensor([1]))
                for _ in shown]

    original = ImageDraw.ImageDraw.text

    def text(self, xy, line, *args, **kwargs):
        drawn.append((line, kwargs.get("fill")))
        return original(self, xy, line, *args, **kwargs)

    monkeypatch.setattr(detector, "detect", detect)
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    with_boxes = pixels(write_examples_grid(detector, shapes.rows, tmp_path / "boxes.png", shapes.answers, count=2,
                                            questions_per_image=1, categories=["circle", "square"]))
    assert asked == [(2, ["circle", "square"], pictures.BOX_THRESHOLD)]
    assert [line for line, fill in drawn if fill == pictures.BOX] == ["square", "square"]
    plain = pixels(write_examples_grid(detector, shapes.rows, tmp_path / "plain.png", shapes.answers, count=2,
                                       questions_per_image=1))
    assert len(asked) == 1  # no categories, no detection

    def magenta(image):
        return int(((image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] > 200)).sum())
    # two boxes of 32 x 32 model pixels, drawn 3x enlarged with a 2-pixel outline
    assert magenta(plain) == 0 and magenta(with_boxes) > 2 * 4 * 90 * 2
