"""OUTPUT/examples.png: test pictures of the shapes data with what the trained model says about them (its caption,
its answers to a few questions beside the truth, and the boxes it detects, drawn on the picture with their
names), so that a run can be judged by eye as well as by the numbers of eval_test.json. Drawn with PIL alone
(its built-in bitmap font: no font files, no download)."""
from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

EXAMPLES_FILE = "examples.png"

MARGIN = 8             # pixels around and between the cells
PADDING = 4            # pixels between a cell's border and its text
MIN_CELL_WIDTH = 160   # the text needs some room even when the pictures are small
MAX_LINES = 2          # lines per text (caption, truth, each question); the rest is cut with "..."
BACKGROUND = (255, 255, 255)
CELL = (244, 244, 244)
NEUTRAL = (0, 0, 0)
TRUTH = (90, 90, 90)
RIGHT = (0, 130, 0)
WRONG = (200, 0, 0)
BOX = (255, 0, 255)    # detected boxes: magenta reads on dark and light backgrounds alike
BOX_THRESHOLD = 0.3    # the score a detection needs to be drawn (`UniPerceiver.detect`'s default)


@dataclass
class Example:
    """One cell of the grid: a picture, the model's caption, the first true caption and the (question,
    predicted answer, true answer) triples."""
    picture: Image.Image
    caption: str
    true_caption: str
    captions: list[str] = field(default_factory=list)
    qa: list[tuple[str, str, str]] = field(default_factory=list)
    boxes: list[tuple[tuple[float, float, float, float], str]] = field(default_factory=list)  # xyxy, name


def _pick_questions(questions: Sequence[str], answers: Sequence[str], types: Sequence[str] | None,
                    k: int) -> list[tuple[str, str]]:
    """Up to `k` (question, answer) pairs, one per question type first (a count, a colour, a relation...) so
    that a few lines show as many kinds of question as possible; then the rest in order."""
    order = list(range(len(questions)))
    types = list(types) if types is not None and len(types) == len(questions) else [None] * len(questions)
    first, seen = [], set()
    for i in order:
        if types[i] not in seen:
            seen.add(types[i])
            first.append(i)
    picked = (first + [i for i in order if i not in first])[:max(k, 0)]
    return [(questions[i], answers[i]) for i in picked]


def collect_examples(model, rows, answers: Sequence[str], count: int = 12, questions_per_image: int = 3,
                     batch_size: int = 16, categories: Sequence[str] | None = None) -> list[Example]:
    """What `model` says about the first `count` pictures of `rows` (a shapes split): its caption of each, its
    answers, ranked from the candidates `answers`, to up to `questions_per_image` of its questions, and, for a
    model with a detection head and given `categories`, the boxes it finds scoring at least BOX_THRESHOLD.
    Runs in eval mode under torch.no_grad() and puts the model back in the mode it came in, since this is
    called on models that may go on training."""
    from torchvision.ops import nms

    from eval.encoding import model_device, model_image_size
    from tasks.base import stack_images

    count = min(int(count), len(rows))
    if count < 1:
        raise ValueError(f"collect_examples: no pictures to show (count {count}, {len(rows)} rows)")
    data = rows[:count]
    types = data.get("qa_types") or [None] * count
    chosen = [_pick_questions(q, a, t, questions_per_image)
              for q, a, t in zip(data["questions"], data["answers"], types)]
    pictures = [image.convert("RGB") for image in data["image"]]
    size, device = model_image_size(model, default=64), model_device(model)
    captions: list[str] = []
    predicted: list[str] = []
    detected: list[list] = [[] for _ in range(count)]
    detects = bool(categories) and getattr(model, "has_detection", False)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                images = stack_images(pictures[start:stop], size).to(device)
                captions += list(model.caption(images))
                owners = [i for i in range(stop - start) for _ in chosen[start + i]]
                if owners:
                    questions = [q for pairs in chosen[start:stop] for q, _ in pairs]
                    picked = images[torch.tensor(owners, device=images.device)]
                    predicted += list(model.answer(picked, questions, list(answers)))
                if detects:
                    for i, found in enumerate(model.detect(pictures[start:stop], list(categories), BOX_THRESHOLD)):
                        # one name per object on the picture: detect keeps a box's runner-up names too (AP counts
                        # them), which would stack labels on one shape
                        keep = nms(found.boxes, found.scores, 0.3).tolist()
                        detected[start + i] = [(tuple(found.boxes[k].tolist()), categories[int(found.labels[k])])
                                               for k in keep]
    finally:
        model.train(was_training)
    examples, position = [], 0
    for i in range(count):
        qa = []
        for question, truth in chosen[i]:
            qa.append((question, predicted[position], truth))
            position += 1
        references = list(data["captions"][i])
        examples.append(Example(pictures[i], captions[i], references[0] if references else "", references, qa,
                                detected[i]))
    return examples


def default_font():
    """PIL's built-in bitmap font: always there, no font file or download, and legible at its one small size
    (Pillow >= 10.1's `load_default()` gives a FreeType font instead, whose spaces nearly vanish at 10 px)."""
    return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


def _drawable(text: str, font) -> str:
    """`text` with what the font cannot draw replaced by "?": the bitmap font has Latin-1 only, and an
    untrained model's caption can hold any token of the vocabulary."""
    if isinstance(font, ImageFont.ImageFont):
        text = unicodedata.normalize("NFKC", text).encode("latin-1", "replace").decode("latin-1")
    return text


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = MAX_LINES) -> list[str]:
    """`text` broken into lines that fit `width` pixels (at word boundaries, inside a word only when it is
    longer than a line), at most `max_lines` of them, the last ending in "..." when text was cut."""
    text = _drawable(text, font)

    def fits(line: str) -> bool:
        return draw.textlength(line, font=font) <= width

    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if fits(candidate):
            line = candidate
            continue
        if line:
            lines.append(line)
        while not fits(word) and len(word) > 1:  # a word wider than the cell: break it
            cut = len(word)
            while cut > 1 and not fits(word[:cut]):
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line or not lines:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


def _same_caption(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def _cell_texts(example: Example) -> list[tuple[str, tuple[int, int, int]]]:
    """(text, colour) of each text of a cell: the predicted caption (green when it equals one of the true
    captions, black otherwise, as a caption is rarely word for word), the true caption, then each question
    with the predicted answer in green when right and red when wrong."""
    texts = [(f"pred: {example.caption}",
              RIGHT if any(_same_caption(example.caption, c) for c in example.captions) else NEUTRAL),
             (f"true: {example.true_caption}", TRUTH)]
    for question, predicted, truth in example.qa:
        texts.append((f"{question} -> {predicted} (true: {truth})", RIGHT if predicted == truth else WRONG))
    return texts


def draw_examples_grid(examples: Sequence[Example], image_scale: int = 3, columns: int = 4,
                       questions_per_image: int = 3) -> Image.Image:
    """The grid of `examples`, `columns` cells a row: each picture enlarged `image_scale` times (nearest
    neighbour, so the pixels the model saw stay visible), its texts below. Every cell has room for
    MAX_LINES lines per text, so the grid's size depends only on the number of examples, the pictures' size
    and `questions_per_image`, never on what the model said."""
    if not examples:
        raise ValueError("draw_examples_grid: no examples")
    if image_scale < 1 or columns < 1:
        raise ValueError(f"draw_examples_grid: image_scale {image_scale} and columns {columns} must be >= 1")
    font = default_font()
    picture_w = max(e.picture.width for e in examples) * image_scale
    picture_h = max(e.picture.height for e in examples) * image_scale
    cell_w = max(picture_w, MIN_CELL_WIDTH) + 2 * PADDING
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Agy|", font=font)[3] + 2
    text_lines = MAX_LINES * (2 + max(questions_per_image, max(len(e.qa) for e in examples)))
    cell_h = PADDING + picture_h + PADDING + text_lines * line_h + PADDING
    columns = min(columns, len(examples))
    grid_rows = math.ceil(len(examples) / columns)
    grid = Image.new("RGB", (MARGIN + columns * (cell_w + MARGIN), MARGIN + grid_rows * (cell_h + MARGIN)),
                     BACKGROUND)
    draw = ImageDraw.Draw(grid)
    text_w = cell_w - 2 * PADDING
    for index, example in enumerate(examples):
        x = MARGIN + (index % columns) * (cell_w + MARGIN)
        y = MARGIN + (index // columns) * (cell_h + MARGIN)
        draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=CELL)
        picture = example.picture.resize((example.picture.width * image_scale, example.picture.height * image_scale),
                                         Image.Resampling.NEAREST)
        left = x + (cell_w - picture.width) // 2
        grid.paste(picture, (left, y + PADDING))
        for (x0, y0, x1, y1), name in example.boxes:
            box = [left + x0 * image_scale, y + PADDING + y0 * image_scale,
                   left + x1 * image_scale, y + PADDING + y1 * image_scale]
            draw.rectangle(box, outline=BOX, width=2)
            draw.text((box[0] + 2, box[1] + 1), _drawable(name, font), fill=BOX, font=font)
        top = y + PADDING + picture_h + PADDING
        for text, colour in _cell_texts(example):
            for line in _wrap(draw, text, font, text_w):
                draw.text((x + PADDING, top), line, fill=colour, font=font)
                top += line_h
    return grid


def write_examples_grid(model, rows, path: str | Path, answers: Sequence[str], count: int = 12,
                        questions_per_image: int = 3, image_scale: int = 3, columns: int = 4,
                        batch_size: int = 16, categories: Sequence[str] | None = None) -> Path:
    """Writes the PNG grid of what `model` (a UniPerceiver) says about the first `count` pictures of `rows` (a
    shapes split: image, captions, questions, answers, qa_types), VQA answers ranked from `answers`
    (`data_recipes.shapes.answer_list(config)`), boxes named from `categories` (the shapes) for a model that
    detects. The file is written whole by a rename, so a crash never leaves
    a torn PNG in the run folder. Returns `path`."""
    from .training.files import atomic_write

    path = Path(path)
    examples = collect_examples(model, rows, answers, count, questions_per_image, batch_size, categories)
    grid = draw_examples_grid(examples, image_scale, columns, questions_per_image)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: grid.save(f, format="PNG"))
    return path


def write_run_examples(recipe, export: str | Path, output: str | Path,
                       device: torch.device | str | None = None, **options: Any) -> Path | None:
    """OUTPUT/examples.png for a finished run: the exported model on the test split of the shapes data the run
    trained on. `options` go to `write_examples_grid` (count, questions_per_image, ...). Returns the path, or
    None (saying so) when the recipe trains on no shapes data, as there is then no test split to show."""
    from .pretraining import shapes_test_spec

    spec = shapes_test_spec(recipe)
    if spec is None:
        print(f"{EXAMPLES_FILE} skipped: it shows the shapes dataset, which no task uses")
        return None
    from data_recipes.shapes import answer_list
    from eval.shapes import resolve_shapes_data
    from uniperceiver import UniPerceiver

    rows, _, config = resolve_shapes_data("test", spec)
    model = UniPerceiver.from_pretrained(export, device=device)
    options.setdefault("categories", list(config.shapes))
    path = write_examples_grid(model, rows, Path(output) / EXAMPLES_FILE, answer_list(config), **options)
    print(f"examples of the test split: {path}")
    return path
