"""Hard negative captions made by swapping words, for the retrieval loss.

A contrastive batch rarely holds two captions that differ in one word, so nothing in the loss rewards the encoders
for reading that word: a model can match pictures to captions by their colours alone and still reach a fair R@1
(the shapes world's runs did, their embeddings blind to shapes on both sides). A caption with one word swapped for
another of its kind ("a red circle" -> "a red square"), or two words of a kind swapped with each other ("a red
star and a green circle" -> "a red circle and a green star"), is a false description of the picture that differs
only in what the encoders must learn to read; as extra candidates of each picture they make that reading pay.
This is the hard-negative recipe of compositional retrieval training (swapped-word captions as negatives).

Word groups are given by the caller (the recipe): only words of one group are exchanged, and a plural "s" and the
article before a word ("a"/"an") follow the new word.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

_WORD = re.compile(r"[A-Za-z]+")


def check_word_groups(groups: Sequence[Sequence[str]], argument: str = "negative_words") -> list[list[str]]:
    """Groups of interchangeable words (lower case, each at least two distinct words, no word in two groups)."""
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise ValueError(f"{argument}: expected a list of word lists, e.g. [[circle, square, triangle]], "
                         f"got {groups!r}")
    checked, seen = [], set()
    for i, group in enumerate(groups):
        if isinstance(group, str) or not isinstance(group, Sequence):
            raise ValueError(f"{argument}[{i}]: expected a list of words, got {group!r}")
        words = [str(word).lower() for word in group]
        if len(set(words)) < 2 or len(set(words)) != len(words) or not all(_WORD.fullmatch(w) for w in words):
            raise ValueError(f"{argument}[{i}] {list(group)}: expected at least two distinct single words")
        if seen & set(words):
            raise ValueError(f"{argument}[{i}]: {sorted(seen & set(words))} already belong to another group")
        seen |= set(words)
        checked.append(words)
    return checked


def _occurrences(text: str, groups: list[list[str]]) -> list[tuple[int, int, int, str, bool]]:
    """(start, end, group index, base word, plural) for each word of the text that belongs to a group."""
    where = {word: g for g, group in enumerate(groups) for word in group}
    found = []
    for match in _WORD.finditer(text):
        word = match.group().lower()
        if word in where:
            found.append((match.start(), match.end(), where[word], word, False))
        elif word.endswith("s") and word[:-1] in where:
            found.append((match.start(), match.end(), where[word[:-1]], word[:-1], True))
    return found


def _with_article(segment: str, word: str) -> str:
    """`segment` (the text before `word`) with a final "a"/"an" made to fit the word."""
    match = re.search(r"\b(a|an|A|An)(\s+)$", segment)
    if match is None:
        return segment
    article = "an" if word[0] in "aeiou" else "a"
    if match.group(1)[0].isupper():
        article = article.capitalize()
    return segment[:match.start()] + article + match.group(2)


def swap_words(text: str, groups: list[list[str]], rng: random.Random) -> str | None:
    """One false variant of `text`: a grouped word replaced by another of its group, or (half the time, when the
    text holds two different words of one group) two of them exchanged. None when no word of a group occurs."""
    found = _occurrences(text, groups)
    if not found:
        return None
    pairs = [(a, b) for i, a in enumerate(found) for b in found[i + 1:] if a[2] == b[2] and a[3] != b[3]]
    if pairs and rng.random() < 0.5:
        first, second = rng.choice(pairs)
        replacements = [(first, second[3]), (second, first[3])]
    else:
        chosen = rng.choice(found)
        replacements = [(chosen, rng.choice([w for w in groups[chosen[2]] if w != chosen[3]]))]
    out, cursor = "", 0
    for (start, end, _, _, plural), word in sorted(replacements, key=lambda item: item[0][0]):
        out += _with_article(text[cursor:start], word) + word + ("s" if plural else "")
        cursor = end
    return out + text[cursor:]


def negative_captions(texts: Sequence[str], groups: list[list[str]], per_text: int,
                      seeds: Sequence[int] | None = None) -> tuple[list[str], list[int]]:
    """Up to `per_text` distinct swapped variants of each text (none for a text without grouped words), drawn
    from `seeds[i]` (the data stream's per-sample seeds: a resumed run draws the same) or from the text itself;
    and for each variant the index of the text it was made from."""
    negatives, owners = [], []
    for i, text in enumerate(texts):
        rng = random.Random(f"negatives:{seeds[i]}" if seeds is not None else f"negatives:{text}")
        made: list[str] = []
        for _ in range(4 * per_text):
            variant = swap_words(text, groups, rng)
            if variant is None:
                break
            if variant != text and variant not in made:
                made.append(variant)
            if len(made) == per_text:
                break
        negatives += made
        owners += [i] * len(made)
    return negatives, owners
