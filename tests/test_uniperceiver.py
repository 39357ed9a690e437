"""UniPerceiver as a whole: embeddings, the folder format of save_pretrained/from_pretrained and its errors."""
from __future__ import annotations

import json

import pytest
import torch

from uniperceiver import UniPerceiver, UniPerceiverConfig, tiny_config
from tiny_model import TINY_BACKBONE

BACKBONE = TINY_BACKBONE


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERN25_CACHE_DIR", str(cache))
        torch.manual_seed(0)
        yield UniPerceiver(tiny_config(image={"backbone_overrides": BACKBONE})).eval()


def test_embeddings_are_unit_vectors_of_the_configured_size(model):
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        image_embeddings = model.encode_image(images)
        text_embeddings = model.encode_text(["a red circle", "two blue squares left of a green triangle"])
    assert image_embeddings.shape == (3, 64) and text_embeddings.shape == (2, 64)
    torch.testing.assert_close(image_embeddings.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_embeddings.norm(dim=-1), torch.ones(2))
    # A text's embedding does not depend on the other texts of its batch (padding is masked out).
    with torch.no_grad():
        alone = model.encode_text(["a red circle"])
    torch.testing.assert_close(alone[0], text_embeddings[0], rtol=1e-5, atol=1e-5)


def test_save_and_load_pretrained_round_trip(model, tmp_path):
    folder = model.save_pretrained(tmp_path / "export")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "text_model"}
    assert json.loads((folder / "config.json").read_text())["architecture"] == "UniPerceiver"
    loaded = UniPerceiver.from_pretrained(folder)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(["a red circle"]), model.encode_text(["a red circle"]),
                                   rtol=0, atol=0)
        assert loaded.caption(images, max_length=4) == model.caption(images, max_length=4)


def test_from_pretrained_names_what_is_wrong(model, tmp_path):
    folder = model.save_pretrained(tmp_path / "export")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['model.safetensors'\]"):
        UniPerceiver.from_pretrained(folder)
    other = model.save_pretrained(tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architecture": "CLIP"}))
    with pytest.raises(ValueError, match="architecture is 'CLIP', expected 'UniPerceiver'"):
        UniPerceiver.from_pretrained(other)
    (other / "config.json").write_text(json.dumps({**config, "decoder": {**config["decoder"], "widht": 3}}))
    with pytest.raises(ValueError, match=r"config.decoder: unknown keys \['widht'\]"):
        UniPerceiver.from_pretrained(other)
    wider = model.save_pretrained(tmp_path / "wider")
    (wider / "config.json").write_text(json.dumps({**config, "embed_dim": 32}))
    with pytest.raises(Exception, match="readout.proj.weight"):
        UniPerceiver.from_pretrained(wider)


def test_caption_tokens_outside_the_caption_vocabulary_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERN25_CACHE_DIR", str(tmp_path))
    base = UniPerceiver(tiny_config(image={"backbone_overrides": BACKBONE}))
    ids = base.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    small = UniPerceiver(tiny_config(image={"backbone_overrides": BACKBONE}, caption_vocab=ids))
    assert small.caption_vocab.tolist() == sorted(set(ids) | {small.tokenizer.eos_token_id})
    indices, lengths = small.caption_token_ids(["a red circle"])
    assert lengths.tolist() == [len(ids) + 1]
    with pytest.raises(ValueError, match="caption 'a blue square': tokens"):
        small.caption_token_ids(["a blue square"])


def test_config_round_trips_through_a_dict():
    config = tiny_config()
    again = UniPerceiverConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.text.width == config.decoder.width


def test_finer_token_stages_add_patch_tokens_and_round_trip(tmp_path, monkeypatch):
    """token_stages [-2, -1] at 64 px: 2 global tokens, then the 4x4 stride-16 map, then the 2x2 last stage;
    the token of a patch depends on its own part of the picture; the stages survive save/load, and a config
    written before the field existed still means the last stage alone."""
    monkeypatch.setenv("INTERN25_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": BACKBONE, "token_stages": [-2, -1]})).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, kinds = model.image_tokens(images)
    assert tokens.shape == (2, 2 + 16 + 4, 64) and kinds.tolist()[0] == [2] * 2 + [3] * 20
    folder = model.save_pretrained(tmp_path / "export")
    assert json.loads((folder / "config.json").read_text())["image"]["token_stages"] == [-2, -1]
    loaded = UniPerceiver.from_pretrained(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)
    config = json.loads((folder / "config.json").read_text())
    del config["image"]["token_stages"]
    assert UniPerceiverConfig.from_dict(config).image.token_stages == (-1,)
    with pytest.raises(ValueError, match=r"token_stages \[-1, -1\]"):
        tiny_config(image={"token_stages": [-1, -1]})
    with pytest.raises(ValueError, match=r"the backbone has 4 stages"):
        UniPerceiver(tiny_config(image={"backbone_overrides": BACKBONE, "token_stages": [7]}))

