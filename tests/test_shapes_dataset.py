"""The built-in "shapes" dataset: splits, cache, determinism, boxes against pixels, answers against scenes,
vocabulary coverage and crash safety."""
import dataclasses
import os
import re
from collections import Counter

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from data_recipes import shapes  # noqa: E402
from data_recipes.shapes import (CONFIG_FILE, MAX_TURN, QA_TYPES, SIZES, TEMPORARY_PREFIX, ShapesConfig,  # noqa: E402
                                 answer_list, blind_vqa_accuracies, blind_vqa_accuracy, build_shapes_dataset,
                                 caption_corpus, class_names, coco_categories, default_shapes_folder,
                                 generate_example, relations, render_scene)
from data_recipes.shapes_styles import HUES, MIN_CONTRAST, nearest_colour, shade  # noqa: E402
from data_recipes.text_corpus import (CAPTION_TEMPLATES, COUNT_WORDS, PLURALS, RELATIONS, describe,  # noqa: E402
                                      vocabulary, words)

SMALL = ShapesConfig(seed=3, train_size=40, val_size=10, test_size=10)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERN25_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _examples(config=SMALL, count=300):
    """Scenes and annotations of `count` examples, drawn across the splits."""
    return [generate_example(config, split, i) for split in ("train", "val", "test") for i in range(count // 3)]


def _raw(dataset):
    """Every split's rows with the images as their stored PNG bytes."""
    return {name: split.cast_column("image", datasets.Image(decode=False)).to_list()
            for name, split in dataset.items()}


def test_splits_columns_and_cache(cache, monkeypatch):
    data = build_shapes_dataset(config=SMALL)
    assert {name: len(split) for name, split in data.items()} == {"train": 40, "val": 10, "test": 10}
    folder = default_shapes_folder(SMALL)
    assert folder.parent == cache / "shapes" and (folder / CONFIG_FILE).is_file()
    train = data["train"]
    assert set(train.column_names) == {"image_id", "image", "captions", "questions", "answers", "qa_types",
                                       "label", "objects"}
    assert train.features["label"].names == class_names(SMALL) == list(SMALL.colours)
    assert train.features["objects"]["category"].feature.names == list(SMALL.shapes)
    row = train[0]
    assert row["image"].size == (64, 64) and row["image"].mode == "RGB"
    assert len(row["captions"]) == len(CAPTION_TEMPLATES)
    assert len(row["questions"]) == len(row["answers"]) == len(row["qa_types"]) >= 3
    image_ids = [i for split in data.values() for i in split["image_id"]]
    assert len(set(image_ids)) == len(image_ids)

    # Built once: later calls load the folder and generate nothing.
    stamp = (folder / CONFIG_FILE).stat().st_mtime_ns
    monkeypatch.setattr(shapes, "_generate_split", lambda *a: pytest.fail("regenerated a cached dataset"))
    again = build_shapes_dataset(config=SMALL)
    assert (folder / CONFIG_FILE).stat().st_mtime_ns == stamp
    assert _raw(again) == _raw(data)
    assert caption_corpus(again) == [c for split in data.values() for row in split["captions"] for c in row]
    assert len(caption_corpus(again["val"], with_qa=True)) == sum(
        len(r["captions"]) + 2 * len(r["questions"]) for r in again["val"])
    # Answering blind (from the question alone) beats a uniform guess but is far from perfect; per type too.
    assert 1 / len(answer_list(SMALL)) < blind_vqa_accuracy(data["train"], data["test"]) < 0.6
    by_type = blind_vqa_accuracies(data["train"], data["test"])
    assert set(by_type) <= {"all", *QA_TYPES} and by_type["all"] == blind_vqa_accuracy(data["train"], data["test"])
    types = [t for row in data["test"]["qa_types"] for t in row]
    assert by_type["all"] == pytest.approx(sum(by_type[t] * types.count(t) for t in set(types)) / len(types))


def test_deterministic_from_the_seed(tmp_path):
    first = build_shapes_dataset(tmp_path / "a", SMALL)
    second = build_shapes_dataset(tmp_path / "b", SMALL)
    assert _raw(first) == _raw(second)  # image bytes and every annotation
    other = _raw(build_shapes_dataset(tmp_path / "c", dataclasses.replace(SMALL, seed=4)))
    assert [r["image"]["bytes"] for r in other["train"]] != [r["image"]["bytes"] for r in _raw(first)["train"]]
    assert other["train"][0]["captions"] != _raw(first)["train"][0]["captions"] or \
        other["train"][1]["captions"] != _raw(first)["train"][1]["captions"]
    # An example does not depend on the split sizes.
    _, image, notes = generate_example(dataclasses.replace(SMALL, train_size=5), "train", 7)
    assert np.array_equal(np.asarray(image), np.asarray(first["train"][7]["image"]))
    assert notes["captions"] == first["train"][7]["captions"]


def _clean(scene):
    """The scene without noise, blur or JPEG: the pixels its objects and background are drawn with."""
    return dataclasses.replace(scene, look=dataclasses.replace(scene.look, noise=0.0, blur=0.0, jpeg_quality=None))


@pytest.mark.parametrize("style", ["random", "shifted", "plain"])
def test_boxes_are_tight_and_match_the_rendered_objects(style):
    config = dataclasses.replace(SMALL, style=style)
    seen_sizes, seen_counts, looks = {"small": set(), "large": set()}, Counter(), Counter()
    for scene, image, notes in _examples(config):
        assert notes["objects"] == {"bbox": [list(o.box) for o in scene.objects],
                                    "category": [config.shapes.index(o.shape) for o in scene.objects],
                                    "colour": [config.colours.index(o.colour) for o in scene.objects]}
        assert scene.look.style == style
        looks[scene.look.background] += 1
        seen_counts[len(scene.objects)] += 1
        # Without noise, blur and JPEG, every pixel outside the boxes is the empty scene's background, and every
        # box is the object's extent.
        clean = np.asarray(render_scene(_clean(scene)), dtype=np.int64)
        empty = np.asarray(render_scene(dataclasses.replace(_clean(scene), objects=())), dtype=np.int64)
        outside = np.ones(clean.shape[:2], bool)
        drawn_area = {}
        for obj in scene.objects:
            x, y, w, h = obj.box
            seen_sizes[obj.size].add(w)
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
            assert w == h if obj.shape == "circle" else 0.8 <= h / w <= 1.25
            assert abs(obj.rotation) <= MAX_TURN and (obj.shape != "circle" or obj.rotation == 0)
            outside[y:y + h, x:x + w] = False
            # (The shifted style samples coverage on a 3x grid: a star's thin tip leaves fainter edge pixels.)
            faint = 12 if style == "shifted" else 30
            drawn = np.abs(clean[y:y + h, x:x + w] - empty[y:y + h, x:x + w]).sum(-1) > faint
            rows, cols = np.flatnonzero(drawn.any(1)), np.flatnonzero(drawn.any(0))
            drawn_area[obj] = int(drawn.sum())
            assert rows[0] <= 1 and rows[-1] >= h - 2 and cols[0] <= 1 and cols[-1] >= w - 2, obj
            # The shade is its colour's, far from the background, and the pixels at the box centre show it.
            assert nearest_colour(obj.rgb) == obj.colour
            assert all(np.linalg.norm(np.subtract(obj.rgb, c)) >= MIN_CONTRAST for c in scene.look.colours)
            cx, cy = int(obj.centre[0]), int(obj.centre[1])
            mean = clean[cy - 1:cy + 1, cx - 1:cx + 1].reshape(-1, 3).mean(0)
            assert nearest_colour(mean) == obj.colour, (obj, mean)
        assert np.all(clean[outside] == empty[outside])
        # Boxes keep apart: no two overlap; the largest shape is the only large one.
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                assert relations(a, b), (a, b)
        if len(scene.objects) > 1:
            assert [o.size for o in scene.objects].count("large") == 1
            # The large shape shows the most colour: the label's "largest shape" is the one a person sees as
            # largest. AREA_MARGIN is 1.5 of the random style's outline areas; the shifted style's thinner star
            # keeps 1.26 (data_recipes.shapes); the edge pixels' partial coverage takes off about a tenth.
            margin = 1.15 if style == "shifted" else 1.3
            large = next(o for o in scene.objects if o.size == "large")
            for small in scene.objects:
                if small is not large:
                    assert drawn_area[large] >= margin * drawn_area[small], (large, small, drawn_area)
    for size, (low, high) in SIZES.items():  # sides spread over each size class
        assert min(seen_sizes[size]) <= round(low * 64) + 2 and max(seen_sizes[size]) >= round(high * 64) - 2
    assert max(seen_sizes["small"]) < min(seen_sizes["large"]) and set(seen_counts) == {1, 2, 3, 4}
    assert len(looks) == (1 if style == "plain" else 3)  # every kind of background of the style
    # A scene renders at another size with its boxes scaled.
    scene = _examples(config, count=3)[0][0]
    big = np.asarray(render_scene(_clean(scene), 128), dtype=np.int64)
    x, y, w, h = scene.objects[0].box
    assert nearest_colour(big[2 * y + h, 2 * x + w]) == scene.objects[0].colour


def test_styles_differ_in_look_not_in_words():
    """The held-out style draws the same scenes' words with other pictures; both are deterministic."""
    random_style = generate_example(SMALL, "test", 5)
    shifted = generate_example(dataclasses.replace(SMALL, style="shifted"), "test", 5)
    assert [(o.colour, o.shape, o.box) for o in random_style[0].objects] == \
        [(o.colour, o.shape, o.box) for o in shifted[0].objects]
    assert random_style[2] == shifted[2]  # captions, questions, answers, label, boxes
    assert not np.array_equal(np.asarray(random_style[1]), np.asarray(shifted[1]))
    again = generate_example(dataclasses.replace(SMALL, style="shifted"), "test", 5)
    assert np.array_equal(np.asarray(again[1]), np.asarray(shifted[1]))
    # The random style varies its looks widely: light and dark backgrounds, JPEG in part of the pictures.
    looks = [generate_example(SMALL, "train", i)[0].look for i in range(200)]
    brightness = [sum(look.colours[0]) / 3 for look in looks]
    assert min(brightness) < 80 and max(brightness) > 200
    assert 0.15 < sum(look.jpeg_quality is not None for look in looks) / len(looks) < 0.6
    with pytest.raises(ValueError, match="style 'cartoon'"):
        ShapesConfig(style="cartoon")


def test_plain_style_is_the_random_drawing_without_its_nuisances():
    """The same scenes and words as the random style, on one flat background, with no outline, shading, noise,
    blur or JPEG: the picture is exactly its background plus its objects."""
    plain_config = dataclasses.replace(SMALL, style="plain")
    brightness = []
    for index in range(40):
        scene, image, notes = generate_example(plain_config, "train", index)
        random_scene, _, random_notes = generate_example(SMALL, "train", index)
        assert notes == random_notes
        assert [(o.colour, o.shape, o.box, o.rgb, o.rotation) for o in scene.objects] == \
            [(o.colour, o.shape, o.box, o.rgb, o.rotation) for o in random_scene.objects]
        look = scene.look
        assert (look.style, look.background, len(look.colours)) == ("plain", "flat", 1)
        assert (look.noise, look.blur, look.jpeg_quality, look.shading) == (0.0, 0.0, None, 0.0)
        assert all(o.outline is None for o in scene.objects)
        pixels = np.asarray(image, dtype=np.int64)
        empty = np.asarray(render_scene(dataclasses.replace(scene, objects=())), dtype=np.int64)
        assert np.all(empty == np.asarray(look.colours[0]))
        outside = np.ones(pixels.shape[:2], bool)
        for obj in scene.objects:
            x, y, w, h = obj.box
            outside[y:y + h, x:x + w] = False
            cx, cy = int(obj.centre[0]), int(obj.centre[1])
            assert np.all(pixels[cy, cx] == obj.rgb), obj  # a flat fill: the shade itself at the centre
        assert np.all(pixels[outside] == empty[outside])
        brightness.append(sum(look.colours[0]) / 3)
    assert min(brightness) < 80 and max(brightness) > 200  # dark and light backgrounds both


def test_colour_words_stay_unambiguous():
    """Every shade is named back as the colour it was drawn for, and so are other palettes' named colours."""
    import random
    rng = random.Random(0)
    for colour in HUES:
        assert all(nearest_colour(shade(rng, colour)) == colour for _ in range(300))
    others = {"red": [(255, 0, 0), (220, 20, 60)], "green": [(0, 128, 0), (34, 139, 34), (50, 205, 50)],
              "blue": [(0, 0, 255), (65, 105, 225), (30, 144, 255)], "yellow": [(255, 255, 0), (255, 215, 0)],
              "purple": [(128, 0, 128), (148, 0, 211), (138, 43, 226)], "orange": [(255, 165, 0), (255, 140, 0)]}
    for colour, shades in others.items():
        assert [nearest_colour(rgb) for rgb in shades] == [colour] * len(shades)


def _named(scene, colour, shape):
    matches = [o for o in scene.objects if (o.colour, o.shape) == (colour, shape)]
    assert len(matches) == 1, f"'the {colour} {shape}' is ambiguous or absent"
    return matches[0]


def test_answers_agree_with_the_scene():
    plural_to_shape = {plural: shape for shape, plural in PLURALS.items()}
    answers, types = set(answer_list(SMALL)), Counter()
    for scene, _, notes in _examples():
        objects = scene.objects
        kinds = [(o.colour, o.shape) for o in objects]
        largest = max(objects, key=lambda o: o.box[2])
        assert sum(o.box[2] == largest.box[2] for o in objects) == 1  # the largest shape is unique
        assert notes["label"] == SMALL.colours.index(largest.colour)
        body = notes["captions"][0]
        assert notes["captions"] == [t.format(body) for t in CAPTION_TEMPLATES]
        for (colour, shape), n in Counter(kinds).items():
            assert (describe(colour, shape) if n == 1 else f"{COUNT_WORDS[n]} {colour} {PLURALS[shape]}") in body
        for qa in notes["qa"]:
            question, answer = qa["question"], qa["answer"]
            assert answer in answers and qa["type"] in QA_TYPES
            types[qa["type"]] += 1
            if question == "how many shapes are there?":
                expected = COUNT_WORDS[len(objects)]
            elif m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
                expected = COUNT_WORDS[sum(o.colour == m[1] for o in objects)]
            elif m := re.fullmatch(r"how many (\w+) are there\?", question):
                expected = COUNT_WORDS[sum(o.shape == plural_to_shape[m[1]] for o in objects)]
            elif m := re.fullmatch(r"what colour is the (\w+)\?", question):
                (obj,) = [o for o in objects if o.shape == m[1]]
                expected = obj.colour
            elif m := re.fullmatch(r"what shape is the (\w+) object\?", question):
                (obj,) = [o for o in objects if o.colour == m[1]]
                expected = obj.shape
            elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
                expected = "yes" if (m[1], m[2]) in kinds else "no"
            elif m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question):
                a, b = _named(scene, m[1], m[2]), _named(scene, m[4], m[5])
                expected = "yes" if m[3] in relations(a, b) else "no"
            elif m := re.fullmatch(r"where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", question):
                held = relations(_named(scene, m[1], m[2]), _named(scene, m[3], m[4]))
                assert len(held) == 1
                expected = held[0]
                # The relation agrees with the box centres.
                a, b = _named(scene, m[1], m[2]), _named(scene, m[3], m[4])
                dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
                assert {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[expected]
            else:
                pytest.fail(f"unexpected question {question!r}")
            assert answer == expected, (question, answer, scene)
    assert set(types) == set(QA_TYPES)
    # Yes and no are roughly balanced.
    yes_no = Counter(qa["answer"] for _, _, n in _examples() for qa in n["qa"] if qa["type"] == "yes_no")
    assert 0.35 < yes_no["yes"] / (yes_no["yes"] + yes_no["no"]) < 0.65


def test_training_yes_no_questions_come_with_their_one_word_complement():
    """Training pictures ask each yes/no question twice, the second time with one word changed and the other
    answer; the evaluation splits ask one, and the questions drawn before the complements stay as they were."""
    import random

    for split in ("train", "val", "test"):
        for index in range(30):
            scene, _, notes = generate_example(SMALL, split, index)
            name = f"shapes/{SMALL.seed}/{split}/{index}"
            rng = random.Random(name)
            shapes.sample_scene(rng, SMALL, look_rng=random.Random(f"{name}/look"))
            plain = shapes.scene_annotations(scene, rng, SMALL)["qa"]
            asked = notes["qa"]
            assert asked[:len(plain)] == plain
            yes_no = [qa for qa in plain if qa["type"] == "yes_no"]
            if split != "train":
                assert asked == plain
                continue
            complements = asked[len(plain):]
            assert len(complements) == len(yes_no) >= 1
            for original, complement in zip(yes_no, complements):
                words, other = original["question"].split(), complement["question"].split()
                changed = sum(a != b for a, b in zip(words, other)) + abs(len(words) - len(other))
                exists_pair_absent = original["answer"] == "no" and words[:2] == ["is", "there"]
                # An absent pair's complement is a present one sharing a word when the scene has one.
                assert 1 <= changed <= (3 if exists_pair_absent else 2), (original, complement)  # "a"/"an" may follow
                assert {original["answer"], complement["answer"]} == {"yes", "no"}
                assert complement["type"] == "yes_no"


def test_every_word_is_in_the_tokenizer_corpus(tmp_path):
    data = build_shapes_dataset(tmp_path / "data", SMALL)
    texts = caption_corpus(data, with_qa=True) + answer_list(SMALL) + class_names(SMALL)
    texts += [c["name"] for c in coco_categories(SMALL)]
    texts += [t for _, _, n in _examples(ShapesConfig(colours=("red", "blue"), shapes=("hexagon", "star")), 60)
              for t in n["captions"] + [qa["question"] for qa in n["qa"]]]
    unknown = {w for t in texts for w in words(t)} - vocabulary()
    assert not unknown
    # And the built-in tokenizer, trained on that corpus, has each word as pieces of its own: no byte fallback.
    pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from data_recipes.text_corpus import shapes_corpus
    from data_recipes.tokenizer import train_tokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(train_tokenizer(shapes_corpus(), tmp_path / "tok")))
    pieces = {piece for t in set(texts) for piece in tokenizer.tokenize(t)}
    assert not [p for p in pieces if p.startswith("<0x")]


def test_label_names_categories_and_answers():
    assert coco_categories(SMALL) == [{"id": i, "name": s, "supercategory": "shape"}
                                      for i, s in enumerate(("circle", "square", "triangle", "star", "diamond"))]
    answers = answer_list(SMALL)
    assert len(answers) == len(set(answers)) == 6 + 5 + 5 + 2 + 4
    assert [a for a in answer_list(dataclasses.replace(SMALL, max_shapes=2)) if a in COUNT_WORDS] == \
        ["zero", "one", "two"]
    assert set(RELATIONS) <= set(answers)
    by_shape = dataclasses.replace(SMALL, label="shape")
    assert class_names(by_shape) == list(SMALL.shapes)
    for scene, _, notes in _examples(by_shape, 30):
        assert notes["label"] == SMALL.shapes.index(max(scene.objects, key=lambda o: o.box[2]).shape)
    with pytest.raises(ValueError, match=r"colours \['red', 'pink'\]"):
        ShapesConfig(colours=("red", "pink"))
    with pytest.raises(ValueError, match="label 'size'"):
        ShapesConfig(label="size")


def test_crash_leftovers_and_stale_builds(tmp_path, cache):
    folder = default_shapes_folder(SMALL)
    folder.parent.mkdir(parents=True)
    # A build that died half way left its temporary folder: it is ignored, and removed once it is old.
    fresh = folder.parent / f"{TEMPORARY_PREFIX}{folder.name}-999-deadbeef"
    old = folder.parent / f"{TEMPORARY_PREFIX}{folder.name}-998-deadbeef"
    for leftover in (fresh, old):
        (leftover / "train").mkdir(parents=True)
        (leftover / "train" / "data-00000-of-00001.arrow").write_bytes(b"half")
    os.utime(old, (0, 0))
    data = build_shapes_dataset(config=SMALL)
    assert len(data["train"]) == 40 and fresh.is_dir() and not old.exists()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(TEMPORARY_PREFIX)] == [fresh.name]

    # A folder holding another config's build is rebuilt; a folder that is not a shapes dataset is refused.
    other = dataclasses.replace(SMALL, train_size=12)
    rebuilt = build_shapes_dataset(folder, other)
    assert len(rebuilt["train"]) == 12 and len(build_shapes_dataset(folder, other)["train"]) == 12
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a shapes dataset"):
        build_shapes_dataset(stranger, SMALL)
    assert (stranger / "notes.txt").read_text() == "keep me"
    # A build interrupted before its config file was written is not taken for a complete one.
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(FileExistsError):
        build_shapes_dataset(folder, other)



def test_an_empty_split_is_left_out_and_the_build_reloads(tmp_path):
    """val_size=0: `datasets` cannot load an empty saved split back, so the build leaves it out, reloads, and a
    loader asking for it gets a clear error."""
    from data_recipes.formats import open_dataset

    config = ShapesConfig(train_size=6, val_size=0, test_size=3)
    first = build_shapes_dataset(tmp_path / "s", config)
    again = build_shapes_dataset(tmp_path / "s", config)
    assert sorted(first) == sorted(again) == ["test", "train"] and len(again["test"]) == 3
    with pytest.raises(ValueError, match=r"no split 'val'; the dataset has \['test', 'train'\]"):
        open_dataset(f"shapes:{tmp_path / 's'}?split=val&train_size=6&val_size=0&test_size=3")


def test_a_split_drawn_by_several_processes_is_the_same(tmp_path, monkeypatch):
    """Large splits are drawn by a pool of processes: the bytes and annotations do not depend on it."""
    config = ShapesConfig(seed=5, train_size=1100, val_size=0, test_size=0)
    monkeypatch.setattr(shapes, "build_processes", lambda count: 2)
    pooled = shapes._generate_split(config, "train")
    monkeypatch.setattr(shapes, "build_processes", lambda count: 1)
    alone = shapes._generate_split(config, "train")
    assert pooled == alone and len(alone["image"]) == 1100
    assert shapes.build_processes(100) == 1


def test_scenes_draw_as_generator_5_does():
    """Pinned scenes: the objects, sizes, boxes and turns of two seeds. A change to the order of the scene's
    random draws (or to the area rule) must bump GENERATOR_VERSION, or a cached build serves stale scenes."""
    import random
    pinned = {1: [("purple", "circle", "large", (25, 28, 23, 23), 0.0), ("yellow", "star", "small", (50, 1, 13, 12), 11.8)],
              4: [("blue", "circle", "large", (4, 15, 20, 20), 0.0), ("yellow", "square", "small", (34, 35, 11, 11), 14.7)]}
    for k, expected in pinned.items():
        scene = shapes.sample_scene(random.Random(k), ShapesConfig())
        assert [(o.colour, o.shape, o.size, o.box, round(o.rotation, 1)) for o in scene.objects] == expected, k


def test_the_random_and_shifted_looks_draw_as_generator_4_does():
    """Pinned draws: a cached build is named by GENERATOR_VERSION, so reordering the looks' random draws
    without bumping it would serve stale pictures; this fails first."""
    import random

    from data_recipes.shapes_styles import sample_look
    pinned = {("random", 0): ("gradient", ((226, 177, 161), (253, 190, 221)), None, 16781856329856517315),
              ("random", 2): ("flat", ((208, 198, 186),), 42, 7259380703130999695),
              ("shifted", 1): ("vignette", ((73, 101, 120), (56, 87, 98)), 70, 7190703300742001586)}
    for (style, k), expected in pinned.items():
        look = sample_look(random.Random(k), style, [(200, 30, 30)])
        assert (look.background, look.colours, look.jpeg_quality, look.seed) == expected, (style, k)
