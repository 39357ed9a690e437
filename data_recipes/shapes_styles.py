"""How a shapes scene looks: colour shades, backgrounds and drawing, in three style families.

- "random" (the default, every split): a wide family of looks, so that a model learns colours and shapes rather
  than one renderer. Dark or light backgrounds, flat, pastel, two-tone gradients or textured noise; shades
  from a wide hue, saturation and value range around each colour word; optional outlines and shading; pixel
  noise, blur and JPEG round trips in part of the pictures. Objects may be slightly rotated and stretched
  (`data_recipes.shapes.sample_scene`).
- "shifted": a held-out family that no training picture is drawn from, by a separate code path (numpy
  coverage masks on a 3x grid rather than PIL polygons on a 4x canvas). Radial vignettes, stripes and
  checkerboards in tinted mid tones; lit fills with a highlight and a light rim; fatter stars; always a JPEG
  round trip. It measures how far what a model learnt carries over to pictures drawn otherwise.
- "plain": the random family's drawing with its nuisances taken out: a flat dark or light background, no
  outlines, shading, noise, blur or JPEG. The shades and the geometry stay as wide. For a generative model,
  whose every pixel is a target, the background's texture otherwise costs more of a short run than the
  shapes do (the text-to-image branch trains on it; README).

Colour words stay unambiguous: each colour's shades come from its own hue interval (the intervals do not
touch), and every object's shade is kept well apart from the background's colours.
"""
from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

if TYPE_CHECKING:
    from .shapes import Scene, ShapeObject

RGB = tuple[int, int, int]
# Hue intervals in degrees (red wraps round 0), and saturation and value ranges, of each colour word. Wide, so
# that the named colours of other palettes (CSS's orange at 39 degrees, purple at 300 and half value, ...)
# are inside; apart, so that no shade could be called two names.
HUES = {"red": (-10, 10), "orange": (20, 41), "yellow": (48, 63), "green": (90, 150), "blue": (200, 240),
        "purple": (262, 305)}
SATURATIONS = {"red": (0.6, 1.0), "orange": (0.7, 1.0), "yellow": (0.6, 1.0), "green": (0.5, 1.0),
               "blue": (0.5, 1.0), "purple": (0.45, 1.0)}
VALUES = {"red": (0.6, 1.0), "orange": (0.85, 1.0), "yellow": (0.85, 1.0), "green": (0.45, 0.95),
          "blue": (0.55, 1.0), "purple": (0.45, 0.9)}
MIN_CONTRAST = 80.0  # least RGB distance between an object's shade and each of the background's colours
SUPERSAMPLE = 4      # the random style draws at 4x and box-filters down: anti-aliased edges


@dataclass(frozen=True)
class Look:
    """Everything about a picture beyond its objects' geometry and shades."""
    style: str
    background: str                    # the kind: flat, gradient, texture (random); vignette, stripes, checker
    colours: tuple[RGB, ...]           # the background's colours (one or two)
    angle: float                       # direction of a gradient or of stripes, radians
    noise: float                       # per-pixel Gaussian noise, standard deviation in 0-255 units
    blur: float                        # Gaussian blur radius in pixels (0: none)
    jpeg_quality: int | None           # a JPEG round trip at this quality (None: none)
    shading: float                     # strength of the light ramp across each object (0: flat fills)
    seed: int                          # texture and noise


def shade(rng: random.Random, colour: str) -> RGB:
    """A random shade of a colour word, from that word's hue, saturation and value ranges."""
    hue = rng.uniform(*HUES[colour]) % 360
    rgb = colorsys.hsv_to_rgb(hue / 360, rng.uniform(*SATURATIONS[colour]), rng.uniform(*VALUES[colour]))
    return tuple(int(round(255 * c)) for c in rgb)


def nearest_colour(rgb) -> str:
    """The colour word whose hue interval is nearest to `rgb`'s hue: the name a shade was drawn for."""
    hue = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360

    def distance(interval):
        low, high = interval
        centred = (hue - (low + high) / 2 + 180) % 360 - 180
        return max(0.0, abs(centred) - (high - low) / 2)
    return min(HUES, key=lambda name: distance(HUES[name]))


def _tint(rng: random.Random, value: tuple[float, float], saturation: tuple[float, float]) -> RGB:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return tuple(int(round(255 * c)) for c in rgb)


def sample_look(rng: random.Random, style: str, shades: list[RGB]) -> Look:
    """A look of `style` whose background colours all keep MIN_CONTRAST from every shade."""
    if style not in STYLES:
        raise ValueError(f"shapes style {style!r}: expected one of {STYLES}")
    for _ in range(200):
        look = LOOKS[style](rng)
        if all(math.dist(s, c) >= MIN_CONTRAST for s in shades for c in look.colours):
            return look
    return look  # pragma: no cover - 200 draws without a contrasting background do not happen in practice


def _dark_or_light(rng: random.Random) -> tuple[tuple[float, float], tuple[float, float]]:
    """The value and saturation ranges of a background tint: dark or light, even odds."""
    return ((0.06, 0.45), (0.0, 0.35)) if rng.random() < 0.5 else ((0.78, 1.0), (0.0, 0.3))


def _random_look(rng: random.Random) -> Look:
    value, saturation = _dark_or_light(rng)
    kind = rng.choice(("flat", "gradient", "texture"))
    colours = [_tint(rng, value, saturation)]
    if kind == "gradient":
        colours.append(_tint(rng, value, saturation))
    return Look("random", kind, tuple(colours), rng.uniform(0, 2 * math.pi),
                noise=rng.choice((0.0, rng.uniform(2, 14))), blur=rng.choice((0.0, 0.0, rng.uniform(0.3, 0.8))),
                jpeg_quality=rng.choice((None, None, rng.randint(40, 95))),
                shading=rng.choice((0.0, 0.0, rng.uniform(0.1, 0.35))), seed=rng.getrandbits(64))


def _plain_look(rng: random.Random) -> Look:
    value, saturation = _dark_or_light(rng)
    return Look("plain", "flat", (_tint(rng, value, saturation),), 0.0, noise=0.0, blur=0.0, jpeg_quality=None,
                shading=0.0, seed=rng.getrandbits(64))


def _shifted_look(rng: random.Random) -> Look:
    kind = rng.choice(("vignette", "stripes", "checker"))
    base = _tint(rng, (0.45, 0.8), (0.15, 0.45))
    second = tuple(int(np.clip(c * rng.uniform(0.75, 0.9), 0, 255)) for c in base)
    return Look("shifted", kind, (base, second), rng.uniform(0, math.pi), noise=rng.uniform(0, 4), blur=0.0,
                jpeg_quality=rng.randint(55, 80), shading=rng.uniform(0.2, 0.4), seed=rng.getrandbits(64))


LOOKS = {"random": _random_look, "shifted": _shifted_look, "plain": _plain_look}  # style -> its look's draw
STYLES = tuple(LOOKS)


# ------------------------------------------------------------------------------------------------ geometry
def star_outline(points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    """A star's corners, alternately on the unit circle and on a circle of radius `inner`, a point up."""
    return [((1.0 if i % 2 == 0 else inner) * math.cos(math.pi * i / points - math.pi / 2),
             (1.0 if i % 2 == 0 else inner) * math.sin(math.pi * i / points - math.pi / 2))
            for i in range(2 * points)]


def fill_unit_square(polygon) -> tuple[tuple[float, float], ...]:
    """The polygon stretched to fill the unit square exactly, so that its box is tight."""
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    return tuple(((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in polygon)


def rotated(polygon, degrees: float) -> tuple[tuple[float, float], ...]:
    """The polygon turned about its centre by `degrees`, then stretched back into the unit square (a rotated
    square's box stays tight; the turns used are small, so a square never becomes a diamond)."""
    if not degrees:
        return tuple(polygon)
    turn = math.radians(degrees)
    cos, sin = math.cos(turn), math.sin(turn)
    return fill_unit_square([((x - 0.5) * cos - (y - 0.5) * sin, (x - 0.5) * sin + (y - 0.5) * cos)
                             for x, y in polygon])


# Outlines in the unit square (circles are drawn as ellipses).
POLYGONS = {
    "square": ((0, 0), (1, 0), (1, 1), (0, 1)),
    "triangle": ((0.5, 0), (1, 1), (0, 1)),
    "diamond": ((0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)),
    "star": fill_unit_square(star_outline()),
    "hexagon": ((0, 0.5), (0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1)),
}
SHIFTED_POLYGONS = {**POLYGONS, "star": fill_unit_square(star_outline(inner=0.42))}


def fill_fraction(shape: str, degrees: float = 0.0, polygons=POLYGONS) -> float:
    """The fraction of its box a shape covers when drawn turned by `degrees` (a circle: pi / 4)."""
    if shape == "circle":
        return math.pi / 4
    corners = rotated(polygons[shape], degrees)
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1])))


def outline_of(obj: "ShapeObject", polygons=POLYGONS):
    """The object's polygon in the unit square (None for a circle)."""
    return None if obj.shape == "circle" else rotated(polygons[obj.shape], obj.rotation)


# ------------------------------------------------------------------------------------------------ drawing
def render(scene: "Scene", size: int) -> Image.Image:
    """The picture of a scene at `size` pixels, drawn by its look's style family."""
    look = scene.look
    image = _draw_shifted(scene, size) if look.style == "shifted" else _draw_random(scene, size)
    if look.noise > 0:
        noise = np.random.default_rng(look.seed).normal(0.0, look.noise, (size, size, 3))
        image = Image.fromarray(np.clip(np.rint(np.asarray(image, np.float64) + noise), 0, 255).astype(np.uint8))
    if look.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(look.blur))
    if look.jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=look.jpeg_quality)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def _lit(rgb, factor: np.ndarray) -> np.ndarray:
    """A shade lit by `factor` per pixel (..., ): darker below 1 (scaled towards black), lighter above 1 (blended
    towards white). Both keep the hue, so the colour word stays true; scaling up would clip a channel and
    turn an orange yellow."""
    rgb = np.asarray(rgb, np.float64)
    factor = np.asarray(factor, np.float64)[..., None]
    return np.where(factor <= 1, rgb * factor, rgb + (255 - rgb) * np.minimum(factor - 1, 1))


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1) of a side x side canvas."""
    axis = (np.arange(side) + 0.5) / side
    return np.meshgrid(axis, axis)  # x, y


def _random_background(look: Look, side: int) -> np.ndarray:
    base = np.asarray(look.colours[0], np.float64)
    x, y = _grid(side)
    if look.background == "gradient":
        t = (x - 0.5) * math.cos(look.angle) + (y - 0.5) * math.sin(look.angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        return base + t[..., None] * (np.asarray(look.colours[1], np.float64) - base)
    canvas = np.broadcast_to(base, (side, side, 3)).copy()
    if look.background == "texture":  # low-frequency blotches: a coarse random grid, bicubically enlarged
        generator = np.random.default_rng(look.seed ^ 0x5EED)
        cells = int(generator.integers(3, 9))
        coarse = generator.normal(0.0, 1.0, (cells, cells)).astype(np.float32)
        blotches = np.asarray(Image.fromarray(coarse, "F").resize((side, side), Image.Resampling.BICUBIC))
        canvas += blotches[..., None] * float(generator.uniform(8, 30))
    return canvas


def _draw_random(scene: "Scene", size: int) -> Image.Image:
    """PIL polygons on a 4x canvas, box-filtered down (anti-aliased edges). Each object is drawn into its own
    box's window of the canvas only (the rest of the canvas is not touched)."""
    side = SUPERSAMPLE * size
    scale = side / scene.image_size
    canvas = _random_background(scene.look, side)
    for obj in scene.objects:
        left, top = int(obj.box[0] * scale), int(obj.box[1] * scale)
        right, bottom = min(side, int(math.ceil((obj.box[0] + obj.box[2]) * scale))), \
            min(side, int(math.ceil((obj.box[1] + obj.box[3]) * scale)))
        x, y = obj.box[0] * scale - left, obj.box[1] * scale - top
        w, h = obj.box[2] * scale - 1, obj.box[3] * scale - 1  # pixel-inclusive: w pixels cover x .. x + w - 1
        mask_image = Image.new("L", (right - left, bottom - top), 0)
        draw = ImageDraw.Draw(mask_image)
        polygon = outline_of(obj)
        if polygon is None:
            draw.ellipse((x, y, x + w, y + h), fill=255)
        else:
            draw.polygon([(x + u * w, y + v * h) for u, v in polygon], fill=255)
        mask = np.asarray(mask_image, np.float64)[..., None] / 255
        window = canvas[top:bottom, left:right]
        fill = np.broadcast_to(np.asarray(obj.rgb, np.float64), window.shape)
        if scene.look.shading:  # light from above: brighter at the top of the object, darker below
            rows = (np.arange(bottom - top) + 0.5 - y) / max(h, 1)
            light = 1 + scene.look.shading * (0.5 - np.clip(rows, 0, 1))
            fill = np.broadcast_to(_lit(obj.rgb, light)[:, None], window.shape)
        window = window * (1 - mask) + fill * mask
        if obj.outline is not None:  # a rim inside the shape: the box stays tight
            inner = mask_image.filter(ImageFilter.MinFilter(2 * SUPERSAMPLE + 1))
            rim = mask - np.asarray(inner, np.float64)[..., None] / 255
            window = window * (1 - rim) + np.asarray(obj.outline, np.float64) * rim
        canvas[top:bottom, left:right] = window
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").resize((size, size), Image.Resampling.BOX)


def _inside_polygon(x: np.ndarray, y: np.ndarray, polygon) -> np.ndarray:
    """Even-odd crossing test of every point against a closed polygon (convex or not)."""
    inside = np.zeros(x.shape, bool)
    points = list(polygon)
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < at)
    return inside


def _draw_shifted(scene: "Scene", size: int) -> Image.Image:
    """Coverage on a 3x grid of sample points, averaged per pixel; lit fills with a light rim."""
    look, factor = scene.look, 3
    side = factor * size
    x, y = _grid(side)
    px, py = x * scene.image_size, y * scene.image_size  # in the scene's pixel units
    base, second = (np.asarray(c, np.float64) for c in look.colours)
    if look.background == "vignette":
        radius = np.hypot(x - 0.5, y - 0.5) / math.sqrt(0.5)
        canvas = base + (second - base) * radius[..., None] ** 1.5
    else:
        if look.background == "stripes":
            band = (x * math.cos(look.angle) + y * math.sin(look.angle)) * 7
            pattern = (np.floor(band) % 2).astype(bool)
        else:
            pattern = ((np.floor(x * 6) + np.floor(y * 6)) % 2).astype(bool)
        canvas = np.where(pattern[..., None], second, base)
    for obj in scene.objects:
        bx, by, bw, bh = obj.box
        u, v = (px - bx) / bw, (py - by) / bh  # the box as the unit square
        if obj.shape == "circle":
            inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
        else:
            inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1) & _inside_polygon(u, v, outline_of(obj, SHIFTED_POLYGONS))
        highlight = 1 + look.shading * (0.6 - np.hypot(u - 0.3, v - 0.3))  # lit from the upper left
        fill = _lit(obj.rgb, np.clip(highlight, 0.6, 1.3))
        canvas = np.where(inside[..., None], fill, canvas)
        edge = inside & ~_shrunk(inside, factor)
        canvas = np.where(edge[..., None], 0.5 * canvas + 0.5 * 255, canvas)
    pixels = canvas.reshape(size, factor, size, factor, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _shrunk(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask eroded by `steps` samples in the four directions (its inside, less a rim)."""
    out = mask.copy()
    for _ in range(steps):
        out[1:] &= out[:-1].copy()
        out[:-1] &= out[1:].copy()
        out[:, 1:] &= out[:, :-1].copy()
        out[:, :-1] &= out[:, 1:].copy()
    return out
