"""Both demos' web pages through their HTTP APIs: the pages load nothing from outside the machine, queries and
uploads are bounded, files are served only from the indexed folders, and text to image reports its progress. The
text-to-image command line writes its grid."""
from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_model import TINY_BACKBONE, offline_cache  # noqa: F401  (a fixture)

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from test_retrieval_demo import draw_picture, write_video  # noqa: E402


def assert_offline_page(response) -> None:
    assert response.status_code == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    # nothing but this server: no scheme-qualified or protocol-relative address in the page
    assert not re.search(r"(https?:)?//[a-z0-9]", response.text, re.IGNORECASE), response.text


@pytest.fixture(scope="module")
def retrieval(offline_cache, tmp_path_factory):
    from launch.retrieval.index import RetrievalIndex, model_fingerprint
    from launch.retrieval.web import create_app
    from uniperceiver import UniPerceiver, tiny_config

    root = tmp_path_factory.mktemp("retrieval")
    torch.manual_seed(0)
    export = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE})).save_pretrained(root / "model")
    for i in range(5):
        draw_picture(root / "pictures" / f"{i}.png", i)
    write_video(root / "videos" / "clip.mp4", seconds=3.0)
    (root / "secret.txt").write_text("not for the web")
    model = UniPerceiver.from_pretrained(export)
    index = RetrievalIndex(root / "index", model, model_fingerprint(export))
    index.update(images=root / "pictures", videos=root / "videos")
    client = TestClient(create_app(index, [root / "pictures", root / "videos"]))
    yield client, index, root
    index.close()


def test_the_retrieval_page_and_its_api(retrieval):
    client, index, root = retrieval
    assert_offline_page(client.get("/"))
    found = client.get("/api/search", params={"q": "a red circle", "top": 3}).json()["hits"]
    assert len(found) == 3 and [h["score"] for h in found] == sorted((h["score"] for h in found), reverse=True)
    assert found == [{**hit.__dict__, "width": 64, "height": 64} for hit in index.search("a red circle", top=3)]
    media = client.get(f"/media/{found[0]['entry_id']}")
    assert media.status_code == 200 and media.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(media.content)).size == (64, 64)
    frames = [h for h in client.get("/api/search", params={"q": "grey", "top": 8}).json()["hits"]
              if h["kind"] == "frame"]
    assert {round(h["time"]) for h in frames} == {0, 2}
    assert client.get(f"/media/{frames[0]['entry_id']}").status_code == 200
    upload = io.BytesIO()
    Image.open(root / "pictures" / "3.png").save(upload, format="PNG")
    by_example = client.post("/api/search_image", files={"file": ("q.png", upload.getvalue(), "image/png")},
                             params={"top": 1}).json()["hits"]
    assert by_example[0]["path"].endswith("3.png") and by_example[0]["score"] == pytest.approx(1.0, abs=1e-4)
    status = client.get("/api/status").json()
    assert status["counts"]["picture"] == 5 and status["counts"]["frame"] == 2


def test_the_retrieval_api_refuses_what_it_should(retrieval, monkeypatch):
    client, index, root = retrieval
    assert client.get("/api/search", params={"q": "x" * 501}).status_code == 422
    assert client.get("/api/search", params={"q": "   "}).status_code == 400
    assert client.get("/api/search", params={"q": "a star", "top": 0}).status_code == 400
    assert client.get("/api/search", params={"q": "a star", "top": 1000}).status_code == 400
    assert client.post("/api/search_image", files={"file": ("q.png", b"not a picture", "image/png")}
                       ).status_code == 400
    import launch.retrieval.web as web
    monkeypatch.setattr(web, "MAX_UPLOAD_BYTES", 10)
    big = client.post("/api/search_image", files={"file": ("q.png", b"x" * 200_000, "image/png")})
    assert big.status_code == 413 and "larger than 10 bytes" in big.json()["detail"]
    # files only by entry id, and only under the indexed folders
    for attempt in ("/media/99999", "/media/..%2f..%2fsecret.txt", "/media/../secret.txt",
                    "/media/%2e%2e/%2e%2e/etc/passwd", "/media/-1"):
        response = client.get(attempt)
        assert response.status_code in (404, 422), attempt
        assert b"not for the web" not in response.content and b"root:" not in response.content
    from launch.retrieval.web import create_app
    outside = TestClient(create_app(index, [root / "videos"]))  # the pictures' folder no longer served
    picture_hit = index.search("a red circle", top=1)[0]
    assert outside.get(f"/media/{picture_hit.entry_id}").status_code == 403


def test_the_upload_limit_is_enforced(retrieval):
    import asyncio

    from fastapi import HTTPException

    from launch.web import read_upload

    class Upload:
        def __init__(self, data):
            self.stream = io.BytesIO(data)

        async def read(self, size):
            return self.stream.read(size)

    assert asyncio.run(read_upload(Upload(b"x" * 100), limit=100)) == b"x" * 100
    with pytest.raises(HTTPException) as error:
        asyncio.run(read_upload(Upload(b"x" * 300_000), limit=100_000))
    assert error.value.status_code == 413


@pytest.fixture(scope="module")
def painter_export(offline_cache, tmp_path_factory):
    from uniperceiver import UniPerceiver, tiny_config

    torch.manual_seed(0)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                     diffusion={"image_size": 16, "block_out_channels": [16, 32],
                                                "cross_attention_levels": [False, True], "norm_num_groups": 8}))
    return model.save_pretrained(tmp_path_factory.mktemp("painter"))


def test_the_text_to_image_page_reports_progress_and_serves_the_pictures(painter_export):
    from launch.t2i_demo import create_app, generate
    from uniperceiver import UniPerceiver

    model = UniPerceiver.from_pretrained(painter_export)
    client = TestClient(create_app(model))
    assert_offline_page(client.get("/"))
    job = client.post("/api/generate", json={"prompt": "a red circle", "steps": 3, "images": 2, "seed": 5}).json()
    deadline, state = time.time() + 120, {}
    seen_steps = set()
    while time.time() < deadline:
        state = client.get(f"/api/jobs/{job['id']}").json()
        seen_steps.add(state["done"])
        if state["finished"] or state["error"]:
            break
        time.sleep(0.01)
    assert state["finished"] and state["images"] == 2 and state["done"] == state["total"] == 3, state
    pictures = [Image.open(io.BytesIO(client.get(f"/api/jobs/{job['id']}/{k}.png").content)) for k in range(2)]
    expected = generate(model, "a red circle", images=2, steps=3, seed=5)
    for got, want in zip(pictures, expected):
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    assert client.get(f"/api/jobs/{job['id']}/7.png").status_code == 404
    assert client.get("/api/jobs/nope").status_code == 404
    bad = client.post("/api/generate", json={"prompt": "", "steps": 0, "images": 99})
    assert bad.status_code == 400 and "prompt: empty" in bad.json()["detail"] and "images: 99" in bad.json()["detail"]


def test_the_text_to_image_command_line_writes_a_grid(painter_export, tmp_path, capsys):
    from launch.t2i_demo import main

    main(["--model", str(painter_export), "a blue star", "--out", str(tmp_path / "grid.png"), "--images", "3",
          "--steps", "2", "--scale", "2"])
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (3 * 32, 32)
    assert "3 pictures for 'a blue star'" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no diffusion branch"):
        from uniperceiver import UniPerceiver, tiny_config
        plain = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE})).save_pretrained(tmp_path / "p")
        main(["--model", str(plain), "a star"])
    with pytest.raises(SystemExit, match="not a saved model folder"):
        main(["--model", str(tmp_path / "nothing"), "a star"])
