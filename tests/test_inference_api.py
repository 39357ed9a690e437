"""The inference API a user meets: pictures of any common kind in, answers and scores out; the image processor saved
with the model; `from_pretrained` from folders and hub ids, on the meta device, with errors that name what is
wrong; the weights cache (equal outputs, invalidated by training)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from tiny_model import TINY_BACKBONE, offline_cache  # noqa: F401  (a fixture)
from uniperceiver import ImageProcessor, UniPerceiver, create_model_and_transforms, tiny_config
from uniperceiver.generation import start
from uniperceiver.pretrained import ModelNotFoundError, load_assigned, read_safetensors
from uniperceiver.processing import PROCESSOR_FILE

CLASSES = ["red", "green", "blue"]
ANSWERS = ["yes", "no", "red", "two"]


def picture(seed: int, size: tuple[int, int] = (80, 96)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model(offline_cache):
    torch.manual_seed(0)
    return UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE}, detection={})).eval()


@pytest.fixture(scope="module")
def export(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("export"))


def test_pictures_of_every_kind_give_the_same_outputs(model, tmp_path):
    pictures = [picture(0), picture(1, (64, 64))]
    paths = []
    for i, p in enumerate(pictures):
        paths.append(tmp_path / f"{i}.png")
        p.save(paths[-1])
    arrays = [np.array(p) for p in pictures]
    forms = {
        "PIL": pictures,
        "paths": paths,
        "path strings": [str(p) for p in paths],
        "numpy": arrays,
        "numpy floats": [a.astype(np.float32) / 255 for a in arrays],
        "uint8 tensors": [torch.from_numpy(a).permute(2, 0, 1) for a in arrays],
        "preprocessed": model.image_processor(pictures),
        "mixed": [pictures[0], str(paths[1])],
    }
    with torch.no_grad():
        reference = model.encode_image(pictures)
        for name, images in forms.items():
            torch.testing.assert_close(model.encode_image(images), reference, rtol=0, atol=0, msg=name)
        # one picture alone, in any form, is a batch of one with the same output (batch sizes differ in rounding)
        alone = model.encode_image([pictures[0]])
        torch.testing.assert_close(alone, reference[:1], rtol=1e-5, atol=1e-6)
        for single in (pictures[0], paths[0], arrays[0], torch.from_numpy(arrays[0]).permute(2, 0, 1)):
            torch.testing.assert_close(model.encode_image(single), alone, rtol=0, atol=0)
        # a batched array (B, H, W, 3) of same-size pictures
        same = [picture(2, (64, 64)), picture(3, (64, 64))]
        torch.testing.assert_close(model.encode_image(np.stack([np.array(p) for p in same])),
                                   model.encode_image(same), rtol=0, atol=0)
    # every front end takes the same forms
    assert model.caption(paths, max_length=3) == model.caption(model.image_processor(pictures), max_length=3)
    assert model.answer(arrays, "what colour is it?", ANSWERS) == model.answer(pictures, ["what colour is it?"] * 2,
                                                                               ANSWERS)
    torch.testing.assert_close(model.classify(paths, CLASSES), model.classify(pictures, CLASSES))
    found, again = model.detect(paths, CLASSES), model.detect(pictures, CLASSES)
    assert [d.boxes.tolist() for d in found] == [d.boxes.tolist() for d in again]


def test_wrong_inputs_raise_errors_that_name_the_argument(model, tmp_path):
    with pytest.raises(TypeError, match="images: expected a PIL image, a file path, a numpy array or a tensor, "
                                        "got int"):
        model.encode_image(7)
    with pytest.raises(ValueError, match=r"images: a float tensor is taken as preprocessed pixels of shape "
                                         r"\(3, 64, 64\).*got \(2, 3, 32, 32\)"):
        model.encode_image(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"images\[1\]: a numpy array must be \(H, W\), \(H, W, 3\)"):
        model.encode_image([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 5), np.uint8)])
    with pytest.raises(ValueError, match=r"images: a float array must hold values in \[0, 1\]"):
        model.encode_image(np.full((8, 8, 3), 7.0))
    with pytest.raises(TypeError, match="images: a tensor of raw pixels must be uint8"):
        model.encode_image(torch.zeros(3, 8, 8, dtype=torch.int32))
    with pytest.raises(FileNotFoundError, match="images: .*missing.png: no such file"):
        model.caption(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    with pytest.raises(ValueError, match=r"images\[1\]: .*broken.png is not a readable picture"):
        model.classify([picture(0), tmp_path / "broken.png"], CLASSES)
    with pytest.raises(ValueError, match="images: no images"):
        model.encode_image([])
    with pytest.raises(ValueError, match="questions: 3 texts for 2 images"):
        model.answer([picture(0), picture(1)], ["a", "b", "c"], ANSWERS)
    with pytest.raises(TypeError, match=r"answers\[1\]: expected a string, got int"):
        model.answer(picture(0), "what?", ["yes", 2])
    with torch.no_grad():  # one string is one text, not a list of its characters
        torch.testing.assert_close(model.encode_text("a red circle"), model.encode_text(["a red circle"]))
    with pytest.raises(TypeError, match=r"texts\[0\]: expected a string, got int"):
        model.encode_text([3])
    with pytest.raises(ValueError, match="classify: pass class_names or class_embeddings"):
        model.classify(picture(0))
    with pytest.raises(ValueError, match=r"class_embeddings must be \(num_classes, 64\)"):
        model.classify(picture(0), class_embeddings=torch.zeros(3, 5))


def test_scores_are_the_model_probabilities(model):
    pictures = [picture(0), picture(1)]
    captions, scores = model.caption(pictures, max_length=5, return_scores=True)
    assert captions == model.caption(pictures, max_length=5) and scores.shape == (2,)
    # greedy: the score is the sum of the per-word log-probabilities of the chosen words, end included, as the
    # step-by-step decoder computes them
    from uniperceiver.generation import search
    pixels = model.prepare_images(pictures)
    result = search(model, pixels, beams=1, max_length=5)
    from uniperceiver.generation import incremental_logits
    log_probs = incremental_logits(model, pixels, result.word_indices).log_softmax(-1)
    chosen = log_probs.gather(-1, result.word_indices[..., None])[..., 0]
    end = model.caption_vocab.tolist().index(model.end_token_id)
    for i in range(2):  # words after the first end of sequence are the end repeated at no cost
        row = result.word_indices[i].tolist()
        length = row.index(end) + 1 if end in row else len(row)
        torch.testing.assert_close(scores[i], chosen[i, :length].sum(), rtol=1e-4, atol=1e-4)

    answers, answer_scores = model.answer(pictures, "what colour?", ANSWERS, return_scores=True)
    with torch.no_grad():
        logits = model.readout.similarity(model.vqa_query(pictures, ["what colour?"] * 2),
                                          model.encode_text(ANSWERS), "vqa")
    expected = logits.log_softmax(-1).max(-1)
    assert answers == [ANSWERS[i] for i in expected.indices.tolist()]
    torch.testing.assert_close(answer_scores, expected.values)

    probabilities = model.classify(pictures, CLASSES)
    logits = model.classify(pictures, CLASSES, return_logits=True)
    torch.testing.assert_close(logits.softmax(-1), probabilities)
    with torch.no_grad():
        embeddings = model.class_embeddings(CLASSES)
    torch.testing.assert_close(model.classify(pictures, class_embeddings=embeddings), probabilities)


def test_cached_and_uncached_outputs_are_equal_and_training_invalidates_the_cache(offline_cache, tmp_path):
    torch.manual_seed(1)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE}, detection={})).eval()
    pictures = [picture(0), picture(1)]

    def outputs():
        return (model.caption(pictures, beams=2, max_length=4, return_scores=True),
                model.answer(pictures, "what?", ANSWERS, return_scores=True),
                model.classify(pictures, CLASSES), [d.to_dict() for d in model.detect(pictures, CLASSES)])

    def uncached():
        model.cache.enabled = False
        try:
            return outputs()
        finally:
            model.cache.enabled = True

    initial = {key: value.clone() for key, value in model.state_dict().items()}
    first = outputs()
    assert len(model.cache) >= 4  # vocabulary features and candidates, answers, classes, categories
    cached = outputs()
    plain = uncached()
    assert repr(cached) == repr(first) == repr(plain)
    # a list that changes is a new entry, not a stale one
    assert model.classify(pictures, CLASSES[:2]).shape == (2, 2)
    # an optimizer step in eval mode (no train() call) changes the weights: the cache must notice
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.enable_grad():
        loss = sum(p.float().square().sum() for p in model.parameters())
        loss.backward()
    optimizer.step()
    after, after_plain = outputs(), uncached()
    assert repr(after) == repr(after_plain)
    assert not torch.equal(after[2], first[2])
    # train() empties the cache; nothing is cached while autograd records
    model.train()
    assert len(model.cache) == 0
    with torch.enable_grad():
        model.class_embeddings(CLASSES)
    assert len(model.cache) == 0
    model.eval()
    # load_state_dict (an in-place copy) brings the first weights back, and with them the first outputs
    model.load_state_dict(initial)
    assert repr(outputs()) == repr(first)


def test_from_pretrained_keeps_the_processor_device_and_dtype(model, export):
    assert (export / PROCESSOR_FILE).is_file()
    assert json.loads((export / PROCESSOR_FILE).read_text())["size"] == 64
    loaded, processor = create_model_and_transforms(export)
    assert processor == model.image_processor and loaded.image_processor is processor
    assert not loaded.training and all(not p.is_meta for p in loaded.parameters())
    pictures = [picture(0), picture(1)]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(processor(pictures)), model.encode_image(pictures),
                                   rtol=0, atol=0)
    assert loaded.caption(pictures, max_length=4) == model.caption(pictures, max_length=4)
    # a processor of its own is saved and used
    custom = ImageProcessor(size=64, resize="square", interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
    model.image_processor, original = custom, model.image_processor
    try:
        folder = model.save_pretrained(export.parent / "custom")
    finally:
        model.image_processor = original
    again = UniPerceiver.from_pretrained(folder)
    assert again.image_processor == custom
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pictures), again.encode_image(custom(pictures)), rtol=0, atol=0)
    # bfloat16 on request, close to float32
    half = UniPerceiver.from_pretrained(export, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.dtype == torch.bfloat16
    with torch.no_grad():
        cosine = (half.encode_image(pictures).float() * model.encode_image(pictures)).sum(-1)
    assert cosine.min() > 0.98
    with pytest.raises(ValueError, match="dtype 'float8'"):
        UniPerceiver.from_pretrained(export, dtype="float8")
    # a loaded model trains: its parameters are real, frozen ones stay frozen
    trainable = [p for p in loaded.parameters() if p.requires_grad]
    assert trainable and len(trainable) == len([p for p in model.parameters() if p.requires_grad])


def test_from_pretrained_names_a_missing_partial_or_foreign_folder(export, tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no-such/folder/here: no such folder"):
        UniPerceiver.from_pretrained(tmp_path / "no-such" / "folder" / "here")
    # a partial folder: a tensor missing from the weights
    import shutil
    partial = shutil.copytree(export, tmp_path / "partial")
    state = load_file(partial / "model.safetensors")
    del state["readout.proj.weight"]
    save_file(state, partial / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not fit the model.*missing \['readout.proj.weight'\]"):
        UniPerceiver.from_pretrained(partial)
    (partial / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        UniPerceiver.from_pretrained(partial)
    (partial / PROCESSOR_FILE).write_text(json.dumps({"size": 64, "crop": "centre"}))
    shutil.copy(export / "model.safetensors", partial / "model.safetensors")
    with pytest.raises(ValueError, match=r"preprocessor_config.json: unknown keys \['crop'\]"):
        UniPerceiver.from_pretrained(partial)
    # a foreign folder: the text model's own (a Llama config) is no UniPerceiver
    foreign = shutil.copytree(export / "text_model", tmp_path / "foreign")
    shutil.copy(export / "model.safetensors", foreign / "model.safetensors")
    (foreign / "text_model").mkdir()
    with pytest.raises(ValueError, match="names no architecture \\(it describes a 'llama' model\\)"):
        UniPerceiver.from_pretrained(foreign)
    # a hub id: not cached and offline -> the message says so; in the cache -> found without a network
    hub_cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="'intern25/shapes-tiny': no local folder of that name, and "
                                                 "HF_HUB_OFFLINE is set and the hub id is not in the local cache"):
        UniPerceiver.from_pretrained("intern25/shapes-tiny")
    snapshot = hub_cache / "models--intern25--shapes-tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(export, snapshot)
    (hub_cache / "models--intern25--shapes-tiny" / "refs").mkdir()
    (hub_cache / "models--intern25--shapes-tiny" / "refs" / "main").write_text("0" * 40)
    loaded = UniPerceiver.from_pretrained("intern25/shapes-tiny")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(picture(0)), UniPerceiver.from_pretrained(export).encode_image(
            picture(0)), rtol=0, atol=0)


def test_assigned_loading_keeps_tied_weights_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    source = Tied()
    with torch.device("meta"):
        target = Tied()
    missing, unexpected = load_assigned(target, {"embed.weight": source.embed.weight.detach().double()})
    assert missing == [] and unexpected == []
    assert target.head.weight is target.embed.weight and target.head.weight.dtype == torch.float64
    torch.testing.assert_close(target.head.weight, source.embed.weight.double())


def test_the_weights_reader_matches_safetensors(tmp_path):
    state = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(2, 2).bfloat16(),
             "d": torch.tensor([True, False]), "e": torch.zeros(0, 4)}
    save_file(state, tmp_path / "w.safetensors", metadata={"format": "pt"})
    read = read_safetensors(tmp_path / "w.safetensors")
    expected = load_file(tmp_path / "w.safetensors")
    assert read.keys() == expected.keys()
    for key in state:
        assert read[key].dtype == expected[key].dtype and torch.equal(read[key], expected[key])
        assert read[key].data_ptr() % 64 == 0 or read[key].numel() == 0
    halved = read_safetensors(tmp_path / "w.safetensors", dtype=torch.bfloat16)
    assert halved["a"].dtype == torch.bfloat16 and halved["b"].dtype == torch.int64
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:-8])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors file .*ends inside"):
        read_safetensors(tmp_path / "cut.safetensors")


def test_the_generation_prefix_takes_preprocessed_pixels(model):
    """The internal layers (tasks, suites, the search) keep taking model-ready tensors unchanged."""
    pixels = model.image_processor([picture(0)])
    state = start(model, pixels)
    assert state.cache.batch_size == 1
