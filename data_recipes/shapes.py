"""The built-in synthetic dataset "shapes": small images of one to four coloured shapes on varied backgrounds,
each with captions, question-answer pairs, a class label and COCO boxes. It is deterministic from a seed and
is generated on first use (a few seconds) into the project cache as a Hugging Face dataset on disk.

    from data_recipes.shapes import ShapesConfig, build_shapes_dataset
    data = build_shapes_dataset()              # DatasetDict: train 2000 / val 200 / test 200 images, 64 x 64
    data["train"][0]["captions"][0]            # 'a red circle and two blue stars' (the training target)

The world is made to be learnt by a tiny model at low resolution, and not by one renderer: how a picture looks
(background, shades, outlines, noise, blur, JPEG) is drawn at random from a wide family, `style="random"`; a
separate family that training never sees, `style="shifted"`, measures what carries over; `style="plain"` is the
random family without its nuisances, for the text-to-image branch (`shapes_styles`).
- shapes never overlap (boxes keep a gap), so every shape is whole and every box is tight and unoccluded;
- a scene of several shapes has exactly one large shape, the others are small; a lone shape is either size;
  the large shape also covers at least `AREA_MARGIN` times the area of every small one (a star fills less of
  its box than a square does), so that "the largest shape" is the one a person sees as largest (in the random
  and plain styles; the shifted style draws thinner stars, so a large star there covers at least 1.26 times);
  sides vary continuously within each size class, shapes other than circles may be slightly stretched and
  turned (at most 15 degrees: a square never becomes a diamond), and each has its own shade of its colour;
- `label` is the colour of the largest shape (`ShapesConfig.label="shape"`: its shape); `class_names(config)`;
- captions name the shapes left to right, identical ones grouped ("two green triangles"); the first caption is
  the bare description, the others put it in `text_corpus.CAPTION_TEMPLATES` ("a photo of ...");
- questions are asked only when their answer is unambiguous: "what colour is the star?" only if there is one
  star; a relation holds when one box lies wholly on that side of the other ("left of": it ends before the
  other begins), and "where is ...?" only when exactly one relation holds. Answers come from `answer_list`.
  In the training split every yes/no question also comes with its complement, one word changed and the other
  answer ("is there a red star?" yes, "is there a red circle?" no), as VQAv2 balances its questions in pairs:
  the answer cannot then be read from the question's words alone;
- `objects` are COCO-style: bbox [x, y, w, h] in pixels, category = index of the shape in `config.shapes`,
  which is also the id in `coco_categories(config)`, and colour = index of the colour word in `config.colours`
  (what open-vocabulary detection of "red circle" and the like is scored against).

Every word comes from `data_recipes.text_corpus`, the corpus the built-in tokenizer is trained on.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from .shapes_styles import (POLYGONS, STYLES, SUPERSAMPLE, Look, fill_fraction, render,  # noqa: F401 (re-exported)
                            sample_look, shade)
from .text_corpus import (CAPTION_TEMPLATES, COLOURS, COUNT_WORDS, MAX_SHAPES, PLURALS, QUESTIONS, RELATIONS,
                          SHAPES, YES_NO, count_phrase, describe, join_phrases)

# Bump when a change here changes the data: cached builds are keyed by it (and by the config).
GENERATOR_VERSION = 5
SPLITS = ("train", "val", "test")
# The splits whose yes/no questions each come with their complement (`complement_yes_no`); the evaluation splits
# ask one of each kind, so that their numbers stay comparable from one version to the next.
COMPLEMENTED_SPLITS = ("train",)
# Hexagons are left out by default: at 64 pixels a small one is hard to tell from a circle.
DEFAULT_SHAPES = ("circle", "square", "triangle", "star", "diamond")
LABEL_KINDS = ("colour", "shape")
QA_TYPES = ("colour", "shape", "count", "position", "yes_no")
# The side of an object's box as a fraction of the image side: drawn from these ranges (11-16 and 19-27 pixels
# at 64); the classes keep apart, so that the largest shape of a scene is always clearly the largest.
SIZES = {"small": (0.17, 0.25), "large": (0.30, 0.42)}
# A box's side is not what the eye compares: a star fills 43% of its box, a square all of it, so a large star may
# show less colour than a small square beside it. The large shape's drawn area is kept at least this many times
# every small one's, so that the label ("the colour of the largest shape") is what the picture shows. It is measured
# with the random style's outlines, so that every style draws the same scenes: the shifted style's thinner star
# (0.36 of its box, against 0.43) keeps a large star at 1.26 times.
AREA_MARGIN = 1.5
MAX_STRETCH = 0.15   # a box's height is its width times 1 +- this (circles stay round)
MAX_TURN = 15.0      # degrees an object may be rotated by (half of them are)
CONFIG_FILE = "shapes_config.json"  # written last into a built folder: it marks the build as complete
CACHE_ENV = "INTERN25_CACHE_DIR"
TEMPORARY_PREFIX = ".building-"  # <parent>/.building-<name>-<pid>-<random>: a build in progress


def cache_dir() -> Path:
    """The project's cache: $INTERN25_CACHE_DIR, else $XDG_CACHE_HOME/intern25, else ~/.cache/intern25.
    The same rule as `uniperceiver.tiny_text_model.cache_dir`, repeated: data_recipes imports no model code."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "intern25"


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate. The same config gives the same dataset, byte for byte."""
    seed: int = 0
    image_size: int = 64
    train_size: int = 2000
    val_size: int = 200
    test_size: int = 200
    max_shapes: int = MAX_SHAPES
    colours: tuple[str, ...] = COLOURS
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    label: str = "colour"          # the class of an image: the "colour" or the "shape" of its largest shape
    style: str = "random"          # the family of looks: "random" (training), "shifted" (held out) or "plain"
    duplicate_prob: float = 0.25   # chance that a further shape repeats one already there ("two red stars")

    def __post_init__(self):
        # Lists (from JSON or a CLI) become tuples, so that the config stays hashable.
        object.__setattr__(self, "colours", tuple(self.colours))
        object.__setattr__(self, "shapes", tuple(self.shapes))
        problems = []
        for name, values, known in (("colours", self.colours, COLOURS), ("shapes", self.shapes, SHAPES)):
            unknown = [v for v in values if v not in known]
            if not values or unknown or len(set(values)) != len(values):
                problems.append(f"{name} {list(values)}: expected distinct names from {list(known)}")
        if not 1 <= self.max_shapes <= MAX_SHAPES:
            problems.append(f"max_shapes {self.max_shapes}: expected 1 to {MAX_SHAPES}")
        if self.image_size < 32:
            problems.append(f"image_size {self.image_size}: expected at least 32")
        if min(self.train_size, self.val_size, self.test_size) < 0:
            problems.append("split sizes must be >= 0")
        if self.label not in LABEL_KINDS:
            problems.append(f"label {self.label!r}: expected one of {LABEL_KINDS}")
        if self.style not in STYLES:
            problems.append(f"style {self.style!r}: expected one of {STYLES}")
        if not 0 <= self.duplicate_prob <= 1:
            problems.append(f"duplicate_prob {self.duplicate_prob}: expected a value in [0, 1]")
        if problems:
            raise ValueError("ShapesConfig: " + "; ".join(problems))

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size}

    def fingerprint(self) -> str:
        """A short hash of the config and the generator version: the name of the cached build."""
        text = json.dumps({**asdict(self), "generator_version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str                        # "small" or "large"
    box: tuple[int, int, int, int]   # x, y, w, h in pixels of the scene's image (COCO's bbox)
    category: int                    # index of `shape` in the config's shapes: the COCO category id
    rgb: tuple[int, int, int]        # the shade it is drawn with
    rotation: float = 0.0            # degrees, turned inside its box (the box stays tight)
    outline: tuple[int, int, int] | None = None  # the colour of a rim inside the shape, if it has one

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]  # left to right (by box centre)
    image_size: int
    look: Look = field(repr=False)

    @property
    def background(self) -> tuple[int, int, int]:
        """The background's first colour."""
        return self.look.colours[0]


# ---------------------------------------------------------------------------------------------------------------
# Scenes

def sample_scene(rng: random.Random, config: ShapesConfig | None = None,
                 look_rng: random.Random | None = None) -> Scene:
    """One to `config.max_shapes` non-overlapping shapes: one large (or a lone one of either size), the others
    small, at random positions; colours and shapes uniform, a further shape repeats an earlier one with
    probability `duplicate_prob`; each with its own shade, stretch and turn. Then a look of `config.style`,
    drawn from `look_rng` (default: `rng`): with a generator of its own, every style draws the same scenes."""
    config = config or ShapesConfig()
    look_rng = look_rng or rng
    count = rng.randint(1, config.max_shapes)
    sizes = ["large"] + ["small"] * (count - 1) if count > 1 else [rng.choice(("small", "large"))]
    kinds: list[tuple[str, str]] = []
    for _ in range(count):
        if kinds and rng.random() < config.duplicate_prob:
            kinds.append(rng.choice(kinds))
        else:
            kinds.append((rng.choice(config.colours), rng.choice(config.shapes)))
    extents, turns = _extents_and_turns(rng, [shape for _, shape in kinds], sizes, config.image_size)
    boxes = _place(rng, extents, config.image_size)
    objects = []
    outlined = config.style == "random" and look_rng.random() < 0.15
    for (colour, shape), size, box, turn in zip(kinds, sizes, boxes, turns):
        rgb = shade(rng, colour)
        outline = tuple(int(c * 0.55) for c in rgb) if outlined else None
        objects.append(ShapeObject(colour, shape, size, box, config.shapes.index(shape), rgb, turn, outline))
    objects.sort(key=lambda o: (o.centre, o.box))
    look = sample_look(look_rng, config.style, [o.rgb for o in objects])
    return Scene(tuple(objects), config.image_size, look)


def _extents_and_turns(rng: random.Random, shapes: list[str], sizes: list[str],
                       image_size: int) -> tuple[list[tuple[int, int]], list[float]]:
    """Each shape's box (width, height) and turn, drawn again until the large shape (the first) covers at least
    `AREA_MARGIN` times the area of every small one (so a large star beside a small square is drawn near the
    top of its size class, the square near the bottom of its own: a star of 27 pixels covers 1.5x a square of 14)."""
    while True:
        extents, turns = [], []
        for shape, size in zip(shapes, sizes):
            width = max(4, round(rng.uniform(*SIZES[size]) * image_size))
            stretch = 1.0 if shape == "circle" else rng.uniform(1 - MAX_STRETCH, 1 + MAX_STRETCH)
            extents.append((width, max(4, round(width * stretch))))
            turns.append(rng.uniform(-MAX_TURN, MAX_TURN) if shape != "circle" and rng.random() < 0.5 else 0.0)
        areas = [w * h * fill_fraction(shape, turn) for (w, h), shape, turn in zip(extents, shapes, turns)]
        if len(areas) == 1 or areas[0] >= AREA_MARGIN * max(areas[1:]):
            return extents, turns


def _place(rng: random.Random, extents: list[tuple[int, int]], image_size: int) -> list[tuple[int, int, int, int]]:
    """Boxes of the given (width, height), inside the image and `gap` pixels apart from one another."""
    margin, gap = 1, max(2, image_size // 16)
    while True:  # a failed layout (rare: four shapes fill at most a third of the image) starts again
        boxes: list[tuple[int, int, int, int]] = []
        for w, h in extents:
            for _ in range(100):
                x = rng.randint(margin, image_size - margin - w)
                y = rng.randint(margin, image_size - margin - h)
                if all(x + w + gap <= bx or bx + bw + gap <= x or y + h + gap <= by or by + bh + gap <= y
                       for bx, by, bw, bh in boxes):
                    boxes.append((x, y, w, h))
                    break
            else:
                break
        if len(boxes) == len(extents):
            return boxes


def render_scene(scene: Scene, image_size: int | None = None) -> Image.Image:
    """The RGB image of a scene, at `image_size` (default: the scene's own; boxes scale with it), drawn by its
    look's style family (`shapes_styles.render`). Deterministic: noise and texture come from the look's seed."""
    return render(scene, image_size or scene.image_size)


# ---------------------------------------------------------------------------------------------------------------
# Annotations

def relations(a: ShapeObject, b: ShapeObject) -> list[str]:
    """The relations of `a` to `b` that hold ("left of": a's box ends before b's begins; "above" likewise)."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a.box, b.box
    held = {"left of": ax + aw <= bx, "right of": bx + bw <= ax, "above": ay + ah <= by, "below": by + bh <= ay}
    return [name for name in RELATIONS if held[name]]


def caption_body(scene: Scene) -> str:
    """The shapes left to right, identical ones grouped: 'a red circle, two blue stars and a green square'."""
    groups = Counter((o.colour, o.shape) for o in scene.objects)  # keeps first-seen (left to right) order
    return join_phrases([describe(c, s) if n == 1 else count_phrase(n, c, s) for (c, s), n in groups.items()])


def scene_annotations(scene: Scene, rng: random.Random, config: ShapesConfig | None = None,
                      complement_rng: random.Random | None = None) -> dict[str, Any]:
    """Captions (one per caption template, the bare description first), question-answer pairs, the label and
    the COCO boxes of a scene: {"captions": [str], "qa": [{"question", "answer", "type"}], "label": int,
    "objects": {"bbox": [[x, y, w, h]], "category": [int]}}. The questions drawn depend on `rng`; with
    `complement_rng`, each yes/no question is followed by its complement (`complement_yes_no`), drawn from it,
    after the questions `rng` draws (which stay the same)."""
    config = config or ShapesConfig()
    objects = scene.objects
    kinds = [(o.colour, o.shape) for o in objects]
    shape_counts, colour_counts = Counter(s for _, s in kinds), Counter(c for c, _ in kinds)
    qa: list[dict[str, str]] = []

    def ask(kind: str, answer: str, qa_type: str, **slots: str) -> None:
        qa.append({"question": QUESTIONS[kind].format(**slots), "answer": answer, "type": qa_type})

    ask("count", COUNT_WORDS[len(objects)], "count")
    # How many of one shape, or of one colour: mostly one the scene has, sometimes any (maybe "zero").
    if rng.random() < 0.5:
        shape = rng.choice(objects).shape if rng.random() < 0.75 else rng.choice(config.shapes)
        ask("count_shape", COUNT_WORDS[shape_counts[shape]], "count", shapes=PLURALS[shape])
    else:
        colour = rng.choice(objects).colour if rng.random() < 0.75 else rng.choice(config.colours)
        ask("count_colour", COUNT_WORDS[colour_counts[colour]], "count", colour=colour)
    lone_shapes = [o for o in objects if shape_counts[o.shape] == 1]
    if lone_shapes:
        obj = rng.choice(lone_shapes)
        ask("colour", obj.colour, "colour", shape=obj.shape)
    lone_colours = [o for o in objects if colour_counts[o.colour] == 1]
    if lone_colours:
        obj = rng.choice(lone_colours)
        ask("shape", obj.shape, "shape", colour=obj.colour)
    # Is there ...? Yes half the time.
    absent = [(c, s) for c in config.colours for s in config.shapes if (c, s) not in kinds]
    if rng.random() < 0.5 or not absent:
        (colour, shape), answer = rng.choice(kinds), YES_NO[0]
    else:
        (colour, shape), answer = rng.choice(absent), YES_NO[1]
    ask("exists", answer, "yes_no", object=describe(colour, shape))
    complements = [("exists", colour, shape, answer)]
    # Relations between shapes that "the <colour> <shape>" names unambiguously.
    named = [o for o in objects if kinds.count((o.colour, o.shape)) == 1]
    pairs = [(a, b) for a in named for b in named if a is not b]
    if pairs:
        a, b = rng.choice(pairs)
        relation = rng.choice(relations(a, b))  # boxes never overlap: at least one relation holds
        asked, answer = (relation, YES_NO[0]) if rng.random() < 0.5 else (RELATIONS[relation], YES_NO[1])
        ask("relation", answer, "yes_no", colour=a.colour, shape=a.shape, relation=asked,
            other_colour=b.colour, other_shape=b.shape)
        complements.append(("relation", a, b, asked))
        clear = [(a, b) for a, b in pairs if len(relations(a, b)) == 1]
        if clear:
            a, b = rng.choice(clear)
            ask("where", relations(a, b)[0], "position", colour=a.colour, shape=a.shape,
                other_colour=b.colour, other_shape=b.shape)

    if complement_rng is not None:
        qa += complement_yes_no(complements, kinds, complement_rng, config)
    largest = max(objects, key=lambda o: o.box[2] * o.box[3])  # unique: the others are small
    label = config.colours.index(largest.colour) if config.label == "colour" else largest.category
    body = caption_body(scene)
    return {"captions": [template.format(body) for template in CAPTION_TEMPLATES], "qa": qa, "label": label,
            "objects": {"bbox": [list(o.box) for o in objects], "category": [o.category for o in objects],
                        "colour": [config.colours.index(o.colour) for o in objects]}}


def complement_yes_no(asked: list[tuple], kinds: list[tuple[str, str]], rng: random.Random,
                      config: ShapesConfig) -> list[dict[str, str]]:
    """The complement of each yes/no question: the same question with one word changed, whose answer is the other.
    "is there <a present pair>?" -> the pair with its colour or its shape changed to one the scene lacks: no;
    "is there <an absent pair>?" -> a present pair that shares its colour or its shape (any present pair if none
    does): yes; "is the A <relation> the B?" -> the opposite relation, the other answer."""
    out = []
    for kind, *slots in asked:
        if kind == "exists":
            colour, shape, answer = slots
            if answer == YES_NO[0]:
                options = [(c, shape) for c in config.colours if (c, shape) not in kinds] + \
                          [(colour, s) for s in config.shapes if (colour, s) not in kinds]
            else:
                options = [k for k in kinds if k[0] == colour or k[1] == shape] or list(kinds)
            if not options:
                continue
            other = rng.choice(sorted(set(options)))
            out.append({"question": QUESTIONS["exists"].format(object=describe(*other)),
                        "answer": YES_NO[1] if answer == YES_NO[0] else YES_NO[0], "type": "yes_no"})
        else:
            a, b, relation = slots
            flipped = RELATIONS[relation]
            held = flipped in relations(a, b)
            out.append({"question": QUESTIONS["relation"].format(colour=a.colour, shape=a.shape, relation=flipped,
                                                                 other_colour=b.colour, other_shape=b.shape),
                        "answer": YES_NO[0] if held else YES_NO[1], "type": "yes_no"})
    return out


def class_names(config: ShapesConfig | None = None) -> list[str]:
    """The names of `label`'s classes, in label order: the config's colours (or shapes, with label="shape")."""
    config = config or ShapesConfig()
    return list(config.colours if config.label == "colour" else config.shapes)


def coco_categories(config: ShapesConfig | None = None) -> list[dict[str, Any]]:
    """COCO's "categories" list for the boxes: one per shape, the id being the `objects.category` value."""
    config = config or ShapesConfig()
    return [{"id": i, "name": shape, "supercategory": "shape"} for i, shape in enumerate(config.shapes)]


def answer_list(config: ShapesConfig | None = None) -> list[str]:
    """Every answer a question can have: colours, shapes, counts ("zero" to the most shapes), yes/no and the
    relations (the VQA candidate set)."""
    config = config or ShapesConfig()
    return [*config.colours, *config.shapes, *COUNT_WORDS[:config.max_shapes + 1], *YES_NO, *RELATIONS]


def phrase_groundings(text: str, kinds: list[tuple[str, str]]) -> list[list[int]]:
    """The phrases of `text` that name exactly one of the picture's objects, as [start, end, object index]
    (character offsets): "the red star" when the picture has one red star, "the star" when it has one star,
    "the red object" when it has one red object; and those that name none, with index -1 ("is there a blue
    square?" of a picture without one). A phrase that names several is left out. `kinds` lists the objects'
    (colour, shape) in box order. What VQA's grounding loss supervises: which context region a question's phrase
    means, or that it means none."""
    found = []
    for match in _PHRASE.finditer(text):
        colour, noun = match.group("colour"), match.group("noun")
        shape = None if noun == "object" else noun
        named = [i for i, (c, s) in enumerate(kinds)
                 if (colour is None or c == colour) and (shape is None or s == shape)]
        if len(named) <= 1 and (colour or shape):
            found.append([match.start("phrase"), match.end("phrase"), named[0] if named else -1])
    return found


def count_groundings(text: str, kinds: list[tuple[str, str]]) -> list[list]:
    """The counting phrases of `text` with every object they name, as [start, end, [object indices]] (character
    offsets; the list may be empty): "red shapes" in "how many red shapes are there?", "stars" in "how many
    stars are there?". `kinds` lists the objects' (colour, shape) in box order. What VQA's count loss supervises:
    which context regions such a phrase matches (`tasks.grounding.count_targets`)."""
    found = []
    for match in _COUNTED.finditer(text):
        colour, noun = match.group("colour"), match.group("noun")
        shape = None if noun == "shapes" else _SINGULARS[noun]
        named = [i for i, (c, s) in enumerate(kinds)
                 if (colour is None or c == colour) and (shape is None or s == shape)]
        found.append([match.start("phrase"), match.end("phrase"), named])
    return found


_SINGULARS = {plural: shape for shape, plural in PLURALS.items()}
_COUNTED = re.compile(r"\bhow many (?P<phrase>(?:(?P<colour>%s) )?(?P<noun>shapes|%s))\b"
                      % ("|".join(COLOURS), "|".join(PLURALS.values())))
_PHRASE = re.compile(r"\b(?:the|a|an) (?P<phrase>(?:(?P<colour>%s) )?(?P<noun>%s|object))\b"
                     % ("|".join(COLOURS), "|".join(SHAPES)))


def caption_corpus(dataset, with_qa: bool = False) -> list[str]:
    """Every caption of a Dataset or DatasetDict (every split, in order), with the questions and answers too
    when `with_qa`: e.g. the texts to train a tokenizer or build a caption vocabulary on."""
    parts = dataset.values() if hasattr(dataset, "values") else [dataset]
    texts: list[str] = []
    for part in parts:
        columns = ["captions"] + (["questions", "answers"] if with_qa else [])
        for column in columns:
            texts += [text for row in part[column] for text in row]
    return texts


def blind_vqa_answers(train, test) -> list[str]:
    """The answers of a model that never looks at the image, for every question of `test` in order: the answer
    `train` gives the same question most often (its type's most frequent answer if `train` never asks it)."""
    by_question: dict[str, Counter] = {}
    by_type: dict[str, Counter] = {}
    for questions, answers, types in zip(train["questions"], train["answers"], train["qa_types"]):
        for question, answer, qa_type in zip(questions, answers, types):
            by_question.setdefault(question, Counter())[answer] += 1
            by_type.setdefault(qa_type, Counter())[answer] += 1
    return [(by_question.get(question) or by_type.get(qa_type) or Counter({"": 1})).most_common(1)[0][0]
            for questions, types in zip(test["questions"], test["qa_types"])
            for question, qa_type in zip(questions, types)]


def blind_vqa_accuracies(train, test) -> dict[str, float]:
    """The accuracy of `blind_vqa_answers` on `test`, overall ("all") and per question type: the question-only
    baseline that each VQA score should be read against (a yes/no question is right half the time blind)."""
    targets = [(answer, qa_type) for answers, types in zip(test["answers"], test["qa_types"])
               for answer, qa_type in zip(answers, types)]
    hits: dict[str, list[int]] = {}
    for guess, (answer, qa_type) in zip(blind_vqa_answers(train, test), targets):
        for key in ("all", qa_type):
            hits.setdefault(key, []).append(guess == answer)
    return {key: sum(values) / len(values) for key, values in hits.items()} if targets else {"all": 0.0}


def blind_vqa_accuracy(train, test) -> float:
    """`blind_vqa_accuracies(train, test)["all"]`: about 0.3 on the default dataset against 1/22 for a uniform
    guess."""
    return blind_vqa_accuracies(train, test)["all"]


# ---------------------------------------------------------------------------------------------------------------
# The dataset on disk

def features(config: ShapesConfig | None = None):
    """The `datasets.Features` of a split."""
    from datasets import ClassLabel, Features, Image as ImageFeature, List, Value

    config = config or ShapesConfig()
    return Features({
        "image_id": Value("int64"),
        "image": ImageFeature(),
        "captions": List(Value("string")),
        "questions": List(Value("string")),
        "answers": List(Value("string")),
        "qa_types": List(Value("string")),
        "label": ClassLabel(names=class_names(config)),
        "objects": {"bbox": List(List(Value("float32"), length=4)),
                    "category": List(ClassLabel(names=list(config.shapes))),
                    "colour": List(ClassLabel(names=list(config.colours)))},
    })


def generate_example(config: ShapesConfig, split: str, index: int) -> tuple[Scene, Image.Image, dict[str, Any]]:
    """Scene, image and annotations of one example. Each example has its own generators, seeded by (seed, split,
    index): an example does not depend on the split sizes. The look has a generator of its own, so that the
    styles draw the same scenes with the same words, in other pictures."""
    name = f"shapes/{config.seed}/{split}/{index}"
    rng = random.Random(name)
    scene = sample_scene(rng, config, look_rng=random.Random(f"{name}/look"))
    complement_rng = random.Random(f"{name}/complements") if split in COMPLEMENTED_SPLITS else None
    return scene, render_scene(scene), scene_annotations(scene, rng, config, complement_rng)


def _encoded_example(config: ShapesConfig, split: str, index: int) -> tuple[bytes, dict[str, Any]]:
    """One example as stored: its PNG bytes and annotations."""
    _, image, notes = generate_example(config, split, index)
    png = io.BytesIO()
    image.save(png, format="PNG")
    return png.getvalue(), notes


def _encoded_range(args: tuple[ShapesConfig, str, int, int]) -> list[tuple[bytes, dict[str, Any]]]:
    config, split, start, stop = args
    return [_encoded_example(config, split, index) for index in range(start, stop)]


def build_processes(count: int) -> int:
    """How many processes draw a split of `count` pictures: one per CPU core (at most 8) for large splits, else
    one. Every example has its own generators, so the data does not depend on it."""
    if count < 2000:
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _generate_split(config: ShapesConfig, split: str) -> dict[str, list]:
    columns: dict[str, list] = {name: [] for name in features(config)}
    offset = SPLITS.index(split) * 10_000_000  # image ids unique across splits
    count = config.split_sizes()[split]
    processes = build_processes(count)
    chunks = [(config, split, start, min(start + 500, count)) for start in range(0, count, 500)]
    if processes > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            encoded = [example for chunk in pool.imap(_encoded_range, chunks) for example in chunk]
    else:
        encoded = [example for chunk in map(_encoded_range, chunks) for example in chunk]
    for index, (png, notes) in enumerate(encoded):
        columns["image_id"].append(offset + index)
        columns["image"].append({"bytes": png, "path": None})
        columns["captions"].append(notes["captions"])
        for column, key in (("questions", "question"), ("answers", "answer"), ("qa_types", "type")):
            columns[column].append([pair[key] for pair in notes["qa"]])
        columns["label"].append(notes["label"])
        columns["objects"].append(notes["objects"])
    return columns


def default_shapes_folder(config: ShapesConfig | None = None) -> Path:
    """Where `build_shapes_dataset` caches a config: <cache_dir()>/shapes/<config.fingerprint()>."""
    return cache_dir() / "shapes" / (config or ShapesConfig()).fingerprint()


def _build_info(config: ShapesConfig) -> dict[str, Any]:
    return {"config": asdict(config), "generator_version": GENERATOR_VERSION, "fingerprint": config.fingerprint()}


def build_shapes_dataset(folder: str | os.PathLike | None = None, config: ShapesConfig | None = None):
    """The shapes dataset of `config` as a `datasets.DatasetDict` (train, val, test), built into `folder`
    (default: `default_shapes_folder(config)`) on first use and loaded from it afterwards. A folder built from
    another config (or generator version) is rebuilt. The build is written to a temporary folder that is then
    renamed into place: a crash never leaves a half-written dataset, and concurrent builders do not collide."""
    from datasets import Dataset, DatasetDict, load_from_disk
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    config = config or ShapesConfig()
    folder = Path(folder) if folder is not None else default_shapes_folder(config)
    if _is_built(folder, config):
        return load_from_disk(str(folder))
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not (folder / CONFIG_FILE).is_file():
        raise FileExistsError(f"build_shapes_dataset: {folder} exists and is not a shapes dataset (it has no "
                              f"{CONFIG_FILE}); give a new or empty folder")

    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(folder)
    temporary = folder.parent / f"{TEMPORARY_PREFIX}{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        # A split of size 0 is left out: `datasets` saves an empty split without data files and then fails to
        # load it back, while a missing split gets a clear "no split" error from the loaders.
        splits = {split: Dataset.from_dict(_generate_split(config, split), features=features(config))
                  for split in SPLITS if config.split_sizes()[split] > 0}
        quiet = not are_progress_bars_disabled()
        if quiet:  # a few seconds of work: no progress bars
            disable_progress_bars()
        try:
            DatasetDict(splits).save_to_disk(str(temporary))
        finally:
            if quiet:
                enable_progress_bars()
        (temporary / CONFIG_FILE).write_text(json.dumps(_build_info(config), indent=2), encoding="utf-8")
        if not _is_built(folder, config):  # else another process finished the same build first: use it
            if folder.exists():  # a build of another config: moved aside, then removed
                stale = folder.parent / f"{TEMPORARY_PREFIX}{folder.name}-stale-{uuid.uuid4().hex[:8]}"
                folder.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                temporary.rename(folder)
            except OSError:
                if not _is_built(folder, config):
                    raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return load_from_disk(str(folder))


def _is_built(folder: Path, config: ShapesConfig) -> bool:
    """Whether `folder` holds a complete build of `config` (its config file is written last)."""
    try:
        built = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return built == json.loads(json.dumps(_build_info(config)))


def _remove_abandoned_builds(folder: Path, min_age_s: float = 3600.0) -> None:
    """Deletes temporary folders of `folder` that builds which died (a build takes seconds) left behind."""
    now = time.time()
    for leftover in folder.parent.glob(f"{TEMPORARY_PREFIX}{folder.name}-*"):
        try:
            if now - leftover.stat().st_mtime > min_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def iter_examples(config: ShapesConfig | None = None, split: str = "train") -> Iterable[dict[str, Any]]:
    """The examples of a split generated on the fly (no disk): {"image": PIL, "scene", **annotations}."""
    config = config or ShapesConfig()
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    for index in range(config.split_sizes()[split]):
        scene, image, notes = generate_example(config, split, index)
        yield {"image": image, "scene": scene, **notes}
