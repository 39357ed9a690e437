"""The retrieval demo's index and command line: pictures, video frames and regions indexed from folders; updates
that embed only what changed; a build killed with SIGKILL that resumes to the uninterrupted index; the suite's
ranking; boxes and video times in the hits; unreadable files skipped and listed."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tiny_model import TINY_BACKBONE, offline_cache  # noqa: F401  (a fixture)

av = pytest.importorskip("av")
pytest.importorskip("faiss")

from launch.retrieval import index as index_module  # noqa: E402
from launch.retrieval.index import RetrievalIndex, model_fingerprint  # noqa: E402
from launch.retrieval_demo import main as demo  # noqa: E402

DEMO = str(Path(__file__).resolve().parent.parent / "launch" / "retrieval_demo.py")


def draw_picture(path: Path, seed: int, size: int = 64) -> None:
    rng = np.random.default_rng(seed)
    picture = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
    x, y = rng.integers(4, size // 2, 2)
    ImageDraw.Draw(picture).ellipse([int(x), int(y), int(x) + size // 3, int(y) + size // 3],
                                    fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def write_video(path: Path, seconds: float = 5.0, fps: int = 10) -> None:
    """A video whose frame at t seconds is a flat grey of level 40 * t (so a frame tells its own time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for k in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), int(40 * k / fps), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def export(offline_cache, tmp_path_factory):
    from uniperceiver import UniPerceiver, tiny_config

    torch.manual_seed(0)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE}, detection={}))
    return model.save_pretrained(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def model(export):
    from uniperceiver import UniPerceiver
    return UniPerceiver.from_pretrained(export)


def index_rows(folder: Path) -> list[tuple]:
    with sqlite3.connect(folder / "index.sqlite") as db:
        return sorted(db.execute("SELECT path, kind, time, x0, y0, x1, y1, embedding FROM entries"))


def test_the_command_line_indexes_pictures_and_videos_and_lists_what_it_skipped(export, tmp_path, capsys):
    for i in range(6):
        draw_picture(tmp_path / "pictures" / ("nested" if i % 2 else "") / f"{i}.png", i)
    (tmp_path / "pictures" / "broken.png").write_bytes(b"not a picture")
    (tmp_path / "pictures" / "notes.txt").write_text("not a picture either, and not listed")
    write_video(tmp_path / "videos" / "clip.mp4")
    (tmp_path / "videos" / "corrupt.mp4").write_bytes(b"\x00" * 512)
    result = demo(["--model", str(export), "--images", str(tmp_path / "pictures"), "--videos",
                   str(tmp_path / "videos"), "--index", str(tmp_path / "index"), "--query", "a red circle",
                   "--top", "4", "--out", str(tmp_path / "hits.png"), "--no-progress"])
    out = capsys.readouterr().out
    assert result["counts"]["picture"] == 6 and result["counts"]["frame"] == 3  # 0, 2 and 4 s of a 5 s video
    skipped = {Path(item["path"]).name: item["reason"] for item in result["update"]["skipped"]}
    assert set(skipped) == {"broken.png", "corrupt.mp4"}
    assert "not a readable picture" in skipped["broken.png"] and "video" in skipped["corrupt.mp4"]
    assert f"skipped {tmp_path / 'pictures' / 'broken.png'}: not a readable picture" in out
    assert len(result["hits"]) == 4 and "contact sheet" in out
    scores = [hit["score"] for hit in result["hits"]]
    assert scores == sorted(scores, reverse=True)
    with Image.open(tmp_path / "hits.png") as sheet:
        assert sheet.width > 160 * 3
    frames = sorted(hit.time for hit in RetrievalIndex(tmp_path / "index", _model(export), model_fingerprint(
        export)).search("a grey picture", top=9) if hit.kind == "frame")
    assert frames == pytest.approx([0.0, 2.0, 4.0], abs=0.11)


def _model(export):
    from uniperceiver import UniPerceiver
    return UniPerceiver.from_pretrained(export)


def test_updates_embed_only_what_changed(model, export, tmp_path):
    folder = tmp_path / "pictures"
    for i in range(5):
        draw_picture(folder / f"{i}.png", i)
    index = RetrievalIndex(tmp_path / "index", model, model_fingerprint(export))
    first = index.update(images=folder)
    assert (first.added, first.embedded) == (5, 5)
    again = index.update(images=folder)
    assert (again.added, again.changed, again.removed, again.unchanged, again.embedded) == (0, 0, 0, 5, 0)
    draw_picture(folder / "5.png", 5)                  # new
    draw_picture(folder / "0.png", 50)                 # changed
    os.utime(folder / "0.png", ns=(1, 1))
    (folder / "1.png").unlink()                        # deleted
    third = index.update(images=folder)
    assert (third.added, third.changed, third.removed, third.unchanged, third.embedded) == (1, 1, 1, 3, 2)
    rows = index_rows(tmp_path / "index")
    assert sorted(Path(r[0]).name for r in rows if r[1] == "picture") == ["0.png", "2.png", "3.png", "4.png", "5.png"]
    # the changed picture's embedding is its new content's
    with torch.no_grad():
        expected = model.encode_image(Image.open(folder / "0.png")).float().numpy()[0]
    stored = next(np.frombuffer(r[7], np.float32) for r in rows if Path(r[0]).name == "0.png" and r[1] == "picture")
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    # an index of another model is refused, by name
    with pytest.raises(ValueError, match="built with another model"):
        RetrievalIndex(tmp_path / "index", model, "another-model")


def test_a_build_killed_at_any_moment_resumes_to_the_uninterrupted_index(export, tmp_path):
    folder = tmp_path / "pictures"
    for i in range(160):
        draw_picture(folder / f"{i:03d}.png", i)
    command = [sys.executable, DEMO, "--model", str(export), "--images", str(folder), "--batch-size", "4",
               "--no-progress", "--no-boxes"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([*command, "--index", str(tmp_path / "straight")], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    for attempt in range(3):  # kill -9 after the first committed files; again on the resumed run
        proc = subprocess.Popen([*command, "--index", str(killed)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        target = 8 + 40 * attempt
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and _committed(killed) < target:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = _committed(killed)
    assert 0 < partial < 160, partial  # it really was cut short
    subprocess.run([*command, "--index", str(killed)], check=True, env=env, capture_output=True)
    straight, resumed = index_rows(tmp_path / "straight"), index_rows(killed)
    assert [r[:7] for r in resumed] == [r[:7] for r in straight]  # no duplicate, no missing entry
    for a, b in zip(resumed, straight):
        np.testing.assert_allclose(np.frombuffer(a[7], np.float32), np.frombuffer(b[7], np.float32), atol=1e-5)


def _committed(folder: Path) -> int:
    try:
        with sqlite3.connect(f"file:{folder / 'index.sqlite'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_every_caption_query_tops_what_the_shapes_suite_ranks_first(model, export, tmp_path):
    from data_recipes.shapes import ShapesConfig, build_shapes_dataset
    from eval.shapes import _encode_images, _encode_texts

    rows = build_shapes_dataset(tmp_path / "shapes", ShapesConfig(train_size=1, val_size=1, test_size=24))["test"]
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, picture in enumerate(rows["image"]):
        picture.save(folder / f"{i:03d}.png")
    captions = list(dict.fromkeys(c for caps in rows["captions"] for c in caps))
    with torch.no_grad():
        similarity = _encode_texts(model, captions, 32, False) @ _encode_images(model, rows, 32, False, "cpu").T
    index = RetrievalIndex(tmp_path / "index", model, model_fingerprint(export), boxes=False)
    index.update(images=folder)
    compared = 0
    for j, caption in enumerate(captions):
        best = similarity[j].topk(2)
        if best.values[0] - best.values[1] < 1e-5:
            continue  # a tie: either order is right
        hits = index.search(caption, top=1)
        assert Path(hits[0].path).name == f"{int(best.indices[0]):03d}.png", caption
        assert hits[0].score == pytest.approx(float(best.values[0]), abs=1e-4)
        compared += 1
    assert compared >= len(captions) // 2


def test_hits_carry_their_best_box_and_regions_can_be_searched(model, export, tmp_path, monkeypatch):
    # an untrained head's objectness is low everywhere: index every proposal to exercise the regions path
    monkeypatch.setattr(index_module, "REGION_THRESHOLD", 0.0)
    folder = tmp_path / "pictures"
    for i in range(4):
        draw_picture(folder / f"{i}.png", i, size=96)
    index = RetrievalIndex(tmp_path / "index", model, model_fingerprint(export))
    index.update(images=folder)
    counts = index.store.counts()
    assert counts["region"] == 4 * model.config.detection.num_proposals
    hits = index.search("a red circle", top=2)
    with torch.no_grad():
        query = model.class_embeddings(["a red circle"]).numpy()[0]
    for hit in hits:
        regions = index.store.regions_of([hit.entry_id])[hit.entry_id]
        scores = np.stack([r.embedding for r in regions]) @ query
        assert hit.box_score == pytest.approx(float(scores.max()), abs=1e-5)
        assert hit.box == regions[int(scores.argmax())].box
        x0, y0, x1, y1 = hit.box
        assert 0 <= x0 <= x1 <= 96 + 1e-3 and 0 <= y0 <= y1 <= 96 + 1e-3
    found = index.search("a red circle", top=3, regions=True)
    assert len(found) == 3 and all(hit.kind == "region" and hit.box is not None for hit in found)
    assert [h.score for h in found] == sorted((h.score for h in found), reverse=True)


def test_clear_messages_for_a_bad_model_an_empty_folder_and_bad_arguments(export, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="not a saved model folder"):
        demo(["--model", str(tmp_path), "--images", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="give --images FOLDER, --videos FOLDER or both"):
        demo(["--model", str(export)])
    with pytest.raises(SystemExit, match="--query: 501 characters; at most 500"):
        demo(["--model", str(export), "--images", str(tmp_path / "empty"), "--query", "x" * 501])
    result = demo(["--model", str(export), "--images", str(tmp_path / "empty"), "--index", str(tmp_path / "i"),
                   "--query", "a star", "--no-progress"])
    assert result["hits"] == [] and "the index is empty" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="--images .*missing: no such folder"):
        demo(["--model", str(export), "--images", str(tmp_path / "missing"), "--index", str(tmp_path / "i")])


def test_choice_of_faiss_index_by_size(monkeypatch):
    import faiss

    vectors = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert isinstance(index_module.build_faiss(vectors), faiss.IndexFlatIP)
    monkeypatch.setattr(index_module, "EXACT_LIMIT", 100)
    approximate = index_module.build_faiss(vectors)
    assert isinstance(approximate, faiss.IndexHNSWFlat)
    exact_top = (vectors[:20] @ vectors.T).argmax(axis=1)  # each vector itself
    _, found = approximate.search(vectors[:20], 1)
    assert (found[:, 0] == exact_top).mean() >= 0.9
