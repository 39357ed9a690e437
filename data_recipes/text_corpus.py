"""The English of the built-in "shapes" world: the words for colours, shapes, counts and positions, and a
deterministic corpus of captions, questions and answers about scenes of one to four coloured shapes.

The tokenizer recipe trains the built-in text model's SentencePiece vocabulary on this corpus, so every
word the shapes dataset can say is a known token.
"""
from __future__ import annotations

import functools
import random
import re

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
PLURALS = {shape: shape + "s" for shape in SHAPES}
COUNT_WORDS = ("zero", "one", "two", "three", "four")
MAX_SHAPES = 4
# Relation phrase of A to B -> the phrase of B to A.
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
YES_NO = ("yes", "no")
CAPTION_TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a picture showing {}")
# The questions of the shapes world, by kind; the corpus and the shapes dataset ask exactly these.
QUESTIONS = {
    "colour": "what colour is the {shape}?",
    "shape": "what shape is the {colour} object?",
    "count": "how many shapes are there?",
    "count_shape": "how many {shapes} are there?",
    "count_colour": "how many {colour} shapes are there?",
    "exists": "is there {object}?",
    "relation": "is the {colour} {shape} {relation} the {other_colour} {other_shape}?",
    "where": "where is the {colour} {shape} relative to the {other_colour} {other_shape}?",
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(colour: str, shape: str) -> str:
    """'a red circle', 'an orange star'."""
    return f"{_article(colour)} {colour} {shape}"


def count_phrase(count: int, colour: str | None, shape: str | None) -> str:
    """'one red circle', 'three triangles', 'two blue shapes', 'four shapes'."""
    noun = shape or "shape"
    noun = noun if count == 1 else PLURALS.get(noun, noun + "s")
    words = [COUNT_WORDS[count]] + ([colour] if colour else []) + [noun]
    return " ".join(words)


def join_phrases(phrases: list[str]) -> str:
    """'a, b and c'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def random_scene(rng: random.Random) -> list[tuple[str, str]]:
    """One to four (colour, shape) objects."""
    return [(rng.choice(COLOURS), rng.choice(SHAPES)) for _ in range(rng.randint(1, MAX_SHAPES))]


def scene_texts(scene: list[tuple[str, str]], rng: random.Random) -> list[str]:
    """A caption and question-answer pairs (colour, shape, count, relative position, yes/no) for a scene."""
    objects = [describe(c, s) for c, s in scene]
    texts = [rng.choice(CAPTION_TEMPLATES).format(join_phrases(objects))]
    colour, shape = scene[0]
    texts += [QUESTIONS["colour"].format(shape=shape), colour, QUESTIONS["shape"].format(colour=colour), shape]
    texts += [QUESTIONS["count"], COUNT_WORDS[len(scene)]]
    n_shape = sum(s == shape for _, s in scene)
    texts += [QUESTIONS["count_shape"].format(shapes=PLURALS[shape]), COUNT_WORDS[n_shape],
              count_phrase(n_shape, None, shape)]
    n_colour = sum(c == colour for c, _ in scene)
    texts += [QUESTIONS["count_colour"].format(colour=colour), COUNT_WORDS[n_colour]]
    other_colour, other_shape = rng.choice(COLOURS), rng.choice(SHAPES)
    present = (other_colour, other_shape) in scene
    texts += [QUESTIONS["exists"].format(object=describe(other_colour, other_shape)), YES_NO[0 if present else 1]]
    if len(scene) > 1:
        relation = rng.choice(list(RELATIONS))
        (c1, s1), (c2, s2) = scene[0], scene[1]
        texts += [f"{describe(c1, s1)} {relation} {describe(c2, s2)}",
                  f"{describe(c2, s2)} {RELATIONS[relation]} {describe(c1, s1)}",
                  QUESTIONS["relation"].format(colour=c1, shape=s1, relation=relation, other_colour=c2,
                                               other_shape=s2), rng.choice(YES_NO),
                  QUESTIONS["where"].format(colour=c1, shape=s1, other_colour=c2, other_shape=s2), relation]
    return texts


def shapes_corpus(num_scenes: int = 500, seed: int = 0) -> list[str]:
    """Every word of the shapes world at least once (colour x shape phrases, counts, relations), then the
    texts of `num_scenes` random scenes. The same arguments give the same list."""
    texts = [describe(c, s) for c in COLOURS for s in SHAPES]
    texts += [count_phrase(n, c, s) for n in range(len(COUNT_WORDS)) for c in (None, *COLOURS) for s in (None, *SHAPES)]
    texts += [f"the {s1} is {r} the {s2}" for r in RELATIONS for s1 in SHAPES for s2 in SHAPES if s1 != s2]
    texts += list(YES_NO)
    rng = random.Random(seed)
    for _ in range(num_scenes):
        texts += scene_texts(random_scene(rng), rng)
    return texts


def words(text: str) -> list[str]:
    """The lower-case words of a text, punctuation dropped: "what colour is the star?" -> [..., "star"]."""
    return re.findall(r"[a-z]+", text.lower())


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word of the default corpus (`shapes_corpus()`), which the built-in tokenizer is trained on."""
    return frozenset(word for text in shapes_corpus() for word in words(text))
