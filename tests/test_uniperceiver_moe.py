"""UniPerceiver with attribute-routed MoE feed-forwards in the decoder: every path runs and passes the
attribute codes of its role (see uniperceiver/attributes.py), cached decoding equals the parallel forward,
different roles route differently, the folder format round-trips and a tiny model still learns."""
from __future__ import annotations

import functools

import pytest
import torch

import tasks
from tasks.captioning import caption_vocabulary
from transformers import AutoTokenizer
from uniperceiver import DecoderConfig, SharedDecoder, UniPerceiver, tiny_config
from uniperceiver.attributes import IMAGE_INPUT, decoder_attributes, token_attributes
from uniperceiver.decoder import Modality
from uniperceiver.generation import incremental_logits
from uniperceiver.moe import MoEFeedForward, TokenAttribute as A
from uniperceiver.tiny_text_model import build_tiny_text_model
from tiny_model import TINY_BACKBONE, offline_cache, overfit  # noqa: F401 (offline_cache is a fixture)

BACKBONE = TINY_BACKBONE
MOE = {"moe_experts": 4, "moe_top_k": 2, "layer_scale_init": None}
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white star"]
COLOURS = torch.tensor([[1.5, -1, -1], [-1, -1, 1.5], [-1, 1.5, -1], [1.5, 1.5, -1]])


pytestmark = pytest.mark.usefixtures("offline_cache")


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(str(build_tiny_text_model()))


def make_model(seed: int = 0, dtype=torch.float32, texts=CAPTIONS) -> UniPerceiver:
    torch.manual_seed(seed)
    config = tiny_config(decoder=MOE, image={"backbone_overrides": BACKBONE},
                         caption_vocab=caption_vocabulary(tiny_tokenizer(), texts))
    return UniPerceiver(config).to(dtype).eval()


def images(colours: torch.Tensor, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    noise = torch.randn(len(colours), 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return (colours[:, :, None, None] + 0.3 * noise).to(dtype)


@pytest.fixture(scope="module")
def model() -> UniPerceiver:
    """An untrained MoE model in float64 with a small caption vocabulary."""
    return make_model(seed=1, dtype=torch.float64)


class DecoderCalls:
    """Records the modality ids and attributes of every call of the model's decoder."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.decoder.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append((args[1], kwargs.get("attributes")))

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        self.handle.remove()


def test_config_has_moe_layers(model):
    assert model.config.decoder.moe_experts == 4 and model.config.decoder.moe_top_k == 2
    assert model.config.image.backbone_overrides["dcn_backend"] == "reference"
    assert all(isinstance(block.mlp, MoEFeedForward) for block in model.decoder.blocks)


def test_every_path_runs(model):
    pixels = images(COLOURS[:2], dtype=torch.float64)
    with torch.no_grad():
        assert model.encode_image(pixels).shape == (2, 64)
        assert model.encode_text(["a red circle", "a blue square of some size"]).shape == (2, 64)
    probs = model.classify(pixels, ["red", "blue", "green"])
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, dtype=torch.float64))
    assert set(model.answer(pixels, ["what colour?", "what shape is it?"], answers=["red", "circle"])) <= {
        "red", "circle"}
    assert len(model.answer(pixels, ["what colour?", "what?"], max_length=3)) == 2  # open-ended
    captions = model.caption(pixels, max_length=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert len(model.caption(pixels, beams=2, max_length=3)) == 2


@pytest.mark.parametrize("prompted", [False, True], ids=["caption", "question-prompt"])
def test_incremental_decoding_equals_the_parallel_forward(model, prompted):
    pixels = images(COLOURS[:2], dtype=torch.float64)
    indices, lengths = model.caption_token_ids(["a red circle", "a star"])  # padding among the words
    prompts = ["what colour is the shape?", "what?"] if prompted else None
    with torch.no_grad():
        parallel = model.caption_logits(pixels, indices, lengths, prompts=prompts)
    step_by_step = incremental_logits(model, pixels, indices, prompts=prompts)
    assert step_by_step.shape == parallel.shape
    for i, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(step_by_step[i, :length], parallel[i, :length], rtol=0, atol=1e-9)
    assert parallel.std() > 0.1


def test_roles_route_differently(model):
    pixels = images(COLOURS[:1], dtype=torch.float64)
    indices, lengths = model.caption_token_ids(["a red circle"])
    with DecoderCalls(model) as calls, torch.no_grad():
        model.encode_image(pixels)
        model.encode_text(["a red circle"])
        model.vqa_query(pixels, ["what colour?"])
        model.caption_logits(pixels, indices, lengths)  # also encodes the vocabulary candidates
    assert all(codes is not None and codes.shape == kinds.shape for kinds, codes in calls)
    (image_kinds, image), (_, text), (vqa_kinds, vqa), (caption_kinds, caption), (_, words) = calls

    task_image, task_both = A.INPUT_IMAGE | A.TARGET_TEXT, A.INPUT_IMAGE | A.INPUT_TEXT | A.TARGET_TEXT
    assert image[0, 0] == task_image and image[0, 1] == task_image | A.TOKEN_VISUAL  # <SPE>, then image tokens
    assert image_kinds[0, 1] == Modality.IMAGE_GLOBAL and image_kinds[0, -1] == Modality.IMAGE_PATCH
    assert set(text[0, 1:].tolist()) == {task_image | A.TOKEN_TEXT | A.TARGET_SIDE}
    assert vqa[0, -1] == task_both and vqa[0, -2] == task_both | A.TOKEN_TEXT  # SPE query after the question
    assert set(words[:, 1].tolist()) == {task_both | A.TOKEN_TEXT | A.TARGET_SIDE}
    num_words = indices.shape[1]
    caption_words, caption_queries = caption[0, -2 * num_words:-num_words], caption[0, -num_words:]
    assert set(caption_words.tolist()) == {task_both | A.TOKEN_TEXT | A.CAUSAL_TEXT}
    assert set(caption_queries.tolist()) == {task_both | A.CAUSAL_TEXT}
    assert (caption[0, :-2 * num_words] & A.CAUSAL_TEXT == 0).all()  # the prefix is not causal

    # The gates differ between an image token, a text token, a candidate word and a caption word.
    gate = model.decoder.blocks[0].mlp.gate
    with torch.no_grad():
        gates = gate(torch.stack([image[0, 1], text[0, 1], words[0, 1], caption_words[0], vqa[0, -2]]))
    for i in range(len(gates)):
        for j in range(i):
            assert not torch.allclose(gates[i], gates[j], atol=1e-6), (i, j, gates)
    assert ((gates > 0).sum(-1) == 2).all()  # top-2 of 4 experts


def test_dense_decoder_gets_no_attributes():
    dense = SharedDecoder(DecoderConfig(width=16, depth=1, heads=2))
    kinds = torch.tensor([[Modality.SPE, Modality.TEXT]])
    assert decoder_attributes(dense, kinds, IMAGE_INPUT) is None
    assert token_attributes(kinds, IMAGE_INPUT).tolist() == [[int(A.INPUT_IMAGE | A.TARGET_TEXT),
                                                              int(A.INPUT_IMAGE | A.TARGET_TEXT | A.TOKEN_TEXT)]]


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = make_model(seed=2)  # float32: the dtype from_pretrained builds
    loaded = UniPerceiver.from_pretrained(model.save_pretrained(tmp_path / "moe"))
    assert loaded.config.decoder == model.config.decoder
    pixels = images(COLOURS[:2])
    indices, lengths = model.caption_token_ids(["a red circle", "a star"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(CAPTIONS), model.encode_text(CAPTIONS), rtol=0, atol=0)
        torch.testing.assert_close(loaded.caption_logits(pixels, indices, lengths),
                                   model.caption_logits(pixels, indices, lengths), rtol=0, atol=0)
    assert loaded.caption(pixels, max_length=4) == model.caption(pixels, max_length=4)


def test_retrieval_overfits_four_pairs():
    model, task = make_model(seed=0), tasks.get_task("retrieval")
    captions = [f"a {name} square" for name in ("red", "blue", "green", "yellow")]
    batch = task.format_batch([{"image": image, "caption": caption}
                               for image, caption in zip(images(COLOURS), captions)])
    losses = overfit(model, task, batch, steps=40)
    assert losses[-1] < 0.5 * losses[0], losses
    assert task.predict(model, batch) == [0, 1, 2, 3]
    # The experts were trained: the gates' routers got gradients.
    assert model.decoder.blocks[0].mlp.gate.router.weight.grad.abs().sum() > 0
