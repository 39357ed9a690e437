"""What the retrieval index holds, read from disk: the pictures and videos under a folder, each file's identity
(size and modification time, so that an unchanged file is never decoded again), and frames sampled from videos by
timestamp with PyAV, decoded as a stream so that a long video never sits in memory."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")


@dataclass(frozen=True)
class MediaFile:
    """A picture or a video on disk: `path` absolute, `kind` "picture" or "video", and what says it changed."""
    path: str
    kind: str
    size: int
    mtime_ns: int


@dataclass
class Frame:
    """One picture to embed: a whole picture file (time None) or a video frame at `time` seconds."""
    picture: Image.Image
    time: float | None = None


class UnreadableMediaError(Exception):
    """A file that cannot be decoded: it is skipped and listed, with `reason`."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def scan(folder: str | os.PathLike, suffixes: tuple[str, ...], kind: str) -> list[MediaFile]:
    """Every file under `folder` (recursively, hidden folders left out) whose suffix is one of `suffixes`, sorted."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"--{'images' if kind == 'picture' else 'videos'} {folder}: no such folder")
    found = []
    for directory, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in names:
            if name.lower().endswith(suffixes) and not name.startswith("."):
                path = os.path.join(directory, name)
                try:
                    stat = os.stat(path)
                except OSError:
                    continue  # vanished between the listing and the stat: the next run sees what is there
                found.append(MediaFile(path, kind, stat.st_size, stat.st_mtime_ns))
    return sorted(found, key=lambda f: f.path)


def read_picture(path: str) -> Image.Image:
    """An RGB picture, fully decoded now by the data layer's reader (a truncated file fails here, not later)."""
    from data_recipes.samples import MissingImageError, UnreadableImageError, load_image

    try:
        return load_image(path)
    except UnreadableImageError as error:
        raise UnreadableMediaError(path, f"not a readable picture ({error.reason})") from error
    except (MissingImageError, Image.DecompressionBombError) as error:
        raise UnreadableMediaError(path, f"not a readable picture ({error})") from error


def picture_of(path: str, time: float | None) -> Image.Image:
    """What an index entry shows: the picture file, or the video's frame at `time` seconds."""
    return read_picture(path) if time is None else frame_at(path, time)


def sample_video(path: str, every_seconds: float = 2.0, max_frames: int = 16) -> Iterator[Frame]:
    """Frames at 0, `every_seconds`, 2 x `every_seconds`, ... (at most `max_frames`, spread over the whole video
    when it is longer than the budget), each the first decoded frame at or after its timestamp. Decoding streams:
    only the frame at hand is kept."""
    import av

    if every_seconds <= 0 or max_frames < 1:
        raise ValueError(f"video sampling: every_seconds {every_seconds} must be > 0 and max_frames {max_frames} "
                         ">= 1")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise UnreadableMediaError(path, f"not a readable video ({error})") from error
    with container:
        streams = container.streams.video
        if not streams:
            raise UnreadableMediaError(path, "no video stream")
        stream = streams[0]
        duration = _duration_seconds(container, stream)
        step = every_seconds
        if duration is not None and duration / every_seconds + 1 > max_frames:
            step = duration / max_frames  # the budget spread over the whole video
        wanted, produced = 0.0, 0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if frame.time + 1e-6 < wanted:
                    continue
                yield Frame(frame.to_image().convert("RGB"), round(float(frame.time), 3))
                produced += 1
                if produced >= max_frames:
                    return
                wanted = math.floor(frame.time / step + 1e-6) * step + step
        except av.error.FFmpegError as error:
            if produced == 0:
                raise UnreadableMediaError(path, f"no frame could be decoded ({error})") from error
            # a damaged tail: the frames before it stand
        if produced == 0:
            raise UnreadableMediaError(path, "no frame could be decoded")


def frame_at(path: str, time: float) -> Image.Image:
    """The first frame at or after `time` seconds (what `sample_video` gave for that timestamp)."""
    import av

    try:
        with av.open(path) as container:
            for frame in container.decode(container.streams.video[0]):
                if frame.time is not None and frame.time + 1e-3 >= time:
                    return frame.to_image().convert("RGB")
    except (av.error.FFmpegError, OSError, IndexError) as error:
        raise UnreadableMediaError(path, f"not a readable video ({error})") from error
    raise UnreadableMediaError(path, f"no frame at {time} s")


def _duration_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    return None
