"""A contact sheet of search hits: each hit's picture (or video frame) with its best box drawn, its rank, score,
file name and video time. PIL alone, with its built-in bitmap font (no font files, no download)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .index import Hit
from .media import picture_of

THUMB = 160
CAPTION_LINES = 3
LINE = 12
MARGIN = 6
BOX = (255, 0, 255)


def draw_box(picture: Image.Image, box, width: int = 2) -> Image.Image:
    picture = picture.copy()
    if box is not None:
        ImageDraw.Draw(picture).rectangle([float(v) for v in box], outline=BOX, width=width)
    return picture


def contact_sheet(hits: Sequence[Hit], title: str, columns: int = 5) -> Image.Image:
    font = ImageFont.load_default()
    columns = max(1, min(columns, len(hits) or 1))
    rows = max(1, math.ceil(len(hits) / columns))
    cell_height = THUMB + CAPTION_LINES * LINE + MARGIN
    sheet = Image.new("RGB", (columns * (THUMB + MARGIN) + MARGIN, LINE + MARGIN * 2 + rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((MARGIN, MARGIN), title[:120], fill=(0, 0, 0), font=font)
    for rank, hit in enumerate(hits):
        x = MARGIN + (rank % columns) * (THUMB + MARGIN)
        y = LINE + 2 * MARGIN + (rank // columns) * cell_height
        try:
            picture = picture_of(hit.path, hit.time)
            scale = THUMB / max(picture.size)  # small pictures are enlarged too, pixel for pixel
            box = None if hit.box is None else [v * scale for v in hit.box]
            picture = draw_box(picture.resize((max(1, round(picture.width * scale)),
                                               max(1, round(picture.height * scale))), Image.NEAREST), box)
            sheet.paste(picture, (x + (THUMB - picture.width) // 2, y + (THUMB - picture.height) // 2))
        except Exception as error:  # a file gone or broken since it was indexed: say so in its cell
            draw.text((x, y + THUMB // 2), f"unreadable: {type(error).__name__}", fill=(200, 0, 0), font=font)
        when = f" @ {hit.time:.1f}s" if hit.time is not None else ""
        lines = [f"#{rank + 1}  {hit.score:.3f}{when}", Path(hit.path).name[:26]]
        if hit.box is not None:
            lines.append(f"box {hit.box_score:.3f}")
        for i, line in enumerate(lines[:CAPTION_LINES]):
            draw.text((x, y + THUMB + 2 + i * LINE), line, fill=(0, 0, 0), font=font)
    return sheet

