"""tasks/: the registry, retrieval (open_clip's ClipLoss semantics) and classification (class names through
prompt templates): a tiny model overfits four examples of each on a CPU, and the loss matches its definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tasks
from tasks.classification import ClassificationTask, imagenet_class_names, imagenet_templates
from tasks.negatives import check_word_groups, negative_captions, swap_words
from tasks.retrieval import clip_loss, clip_loss_with_negatives, negative_separation
from uniperceiver import UniPerceiver, tiny_config
from tiny_model import TINY_BACKBONE, overfit

BACKBONE = TINY_BACKBONE
COLOURS = {"red": (1.5, -1.0, -1.0), "green": (-1.0, 1.5, -1.0), "blue": (-1.0, -1.0, 1.5), "yellow": (1.5, 1.5, -1.0)}


@pytest.fixture(scope="module")
def new_model(tmp_path_factory):
    """Builds a fresh tiny model (64x64 images, reference DCNv3) with the text model cached in a tmp folder."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERN25_CACHE_DIR", str(cache))

        def build(seed: int = 0) -> UniPerceiver:
            torch.manual_seed(seed)
            # No decoder layer scale: with its 1e-3 init every input's <SPE> output starts almost identical (cosine
            # ~1 - 1e-7) and four examples do not separate within a test's budget of steps.
            return UniPerceiver(tiny_config(image={"backbone_overrides": BACKBONE}, decoder={"layer_scale_init": None}))
        yield build


def colour_images(seed: int = 0) -> torch.Tensor:
    """One normalised 64x64 image per colour: the colour plus noise."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.tensor(c)[:, None, None] + 0.3 * torch.randn(3, 64, 64, generator=generator)
                        for c in COLOURS.values()])


def test_registry_builds_tasks_by_name_and_names_the_known_ones():
    assert {"retrieval", "classification"} <= set(tasks.list_tasks())
    retrieval = tasks.get_task("retrieval")
    assert isinstance(retrieval, tasks.Task) and retrieval.name == "retrieval" and retrieval.family == "retrieval"
    classification = tasks.get_task("classification", label_smoothing=0.0, templates=["{}"])
    assert classification.family == "classification" and classification.label_smoothing == 0.0
    with pytest.raises(ValueError, match=r"unknown task 'retreival'; registered tasks: \[.*'classification'.*\]"):
        tasks.get_task("retreival")


def test_clip_loss_is_the_symmetric_cross_entropy_of_scaled_cosines():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(14.0)
    logits = scale * images @ texts.T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss = clip_loss(images, texts, scale)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, images)
    (expected_grad,) = torch.autograd.grad(expected, images)
    torch.testing.assert_close(grad, expected_grad)


SHAPE_WORDS = [["circle", "square", "triangle", "star", "diamond"]]


def test_swapped_word_negatives_change_one_kind_of_word_and_keep_plurals_and_articles():
    import random

    groups = check_word_groups(SHAPE_WORDS + [["red", "orange"]])
    rng = random.Random(0)
    text = "a red circle and two orange stars"
    variants = {swap_words(text, groups, rng) for _ in range(200)}
    assert text not in variants and None not in variants
    # one word replaced by another of its group (plural kept), or two words of a group exchanged
    assert "a red square and two orange stars" in variants and "a red circle and two orange diamonds" in variants
    assert "a red star and two orange circles" in variants
    assert "an orange circle and two orange stars" in variants  # the article follows the new word
    assert all(len(v.split()) == len(text.split()) for v in variants)
    assert swap_words("two blue boxes", groups, rng) is None
    # per-sample seeds: the same draws for the same seeds, none for a text without grouped words
    first, owners = negative_captions([text, "nothing to swap"], groups, 2, seeds=[5, 6])
    assert (first, owners) == negative_captions([text, "nothing to swap"], groups, 2, seeds=[5, 6])
    assert len(first) == 2 and len(set(first)) == 2 and text not in first and owners == [0, 0]
    for bad in ("circle", [["circle"]], [["circle", "circle"]], [["circle", "square"], ["square", "star"]]):
        with pytest.raises(ValueError, match="negative_words"):
            check_word_groups(bad)


def test_clip_loss_with_negatives_adds_them_to_each_images_candidates_only():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(4, 8), dim=-1)
    negatives = F.normalize(torch.randn(3, 8), dim=-1)
    scale = torch.tensor(10.0)
    labels = torch.arange(4)
    per_image = scale * images @ torch.cat([texts, negatives]).T
    expected = (F.cross_entropy(per_image, labels) + F.cross_entropy(scale * texts @ images.T, labels)) / 2
    torch.testing.assert_close(clip_loss_with_negatives(images, texts, negatives, scale), expected)
    # without negatives it is the plain loss; a negative close to an image's own text costs more
    torch.testing.assert_close(clip_loss_with_negatives(images, texts, negatives[:0], scale),
                               clip_loss(images, texts, scale))
    close = F.normalize(texts[:1] + 0.1 * torch.randn(1, 8), dim=-1)
    assert clip_loss_with_negatives(images, texts, close, scale) > clip_loss_with_negatives(images, texts, -close,
                                                                                            scale)


def test_negative_separation_penalises_captions_that_embed_like_their_own_negatives_only():
    torch.manual_seed(0)
    texts = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    near = F.normalize(texts.detach()[[0, 0, 2]] + 0.05 * torch.randn(3, 8), dim=-1)
    far = F.normalize(torch.randn(3, 8), dim=-1)
    scale = torch.tensor(20.0, requires_grad=True)
    owners = [0, 0, 2]
    cosines = (texts[owners] * near).sum(-1)
    assert (cosines > 0.9).all()
    loss = negative_separation(texts, near, owners, 0.9, scale)
    torch.testing.assert_close(loss, (20.0 * (cosines - 0.9)).mean())
    loss.backward()
    assert texts.grad.abs().sum() > 0 and scale.grad is None  # the temperature is not pulled down by it
    assert negative_separation(texts, far, owners, 0.9, scale) == 0  # negatives already apart cost nothing
    with pytest.raises(ValueError, match="negative_margin"):
        tasks.get_task("retrieval", negative_words=SHAPE_WORDS, negative_margin=1.5)
    with pytest.raises(ValueError, match="negative_margin needs negative_words"):
        tasks.get_task("retrieval", negative_margin=0.9)


def test_retrieval_with_negative_words_ranks_each_picture_against_its_swapped_captions(new_model):
    model = new_model(0)
    with pytest.raises(ValueError, match="negative_words"):
        tasks.get_task("retrieval", negative_words=["circle", "square"])
    with pytest.raises(ValueError, match="negatives_per_text"):
        tasks.get_task("retrieval", negative_words=SHAPE_WORDS, negatives_per_text=0)
    task = tasks.get_task("retrieval", negative_words=SHAPE_WORDS)
    captions = [f"a {name} square" for name in COLOURS]
    samples = [{"image": image, "caption": caption, "sample_seed": i}
               for i, (image, caption) in enumerate(zip(colour_images(), captions))]
    batch = task.format_batch(samples)
    assert len(batch["negative_texts"]) == 4 and batch["negative_texts"] == task.format_batch(samples)["negative_texts"]
    assert all(n.startswith(f"a {name} ") and not n.endswith("square")
               for n, name in zip(batch["negative_texts"], COLOURS))
    with torch.no_grad():
        images, texts = model.encode_image(batch["images"]), model.encode_text(captions)
        negatives = model.encode_text(batch["negative_texts"])
        expected = clip_loss_with_negatives(images, texts, negatives, model.readout.scale("retrieval"))
        torch.testing.assert_close(task.loss(model, batch), expected)
        margin = tasks.get_task("retrieval", negative_words=SHAPE_WORDS, negative_margin=-1.0)
        separation = negative_separation(texts, negatives, batch["negative_owners"], -1.0,
                                         model.readout.scale("retrieval"))
        assert separation > 0
        torch.testing.assert_close(margin.loss(model, batch), expected + separation)
        plain = {key: value for key, value in batch.items() if key != "negative_texts"}
        torch.testing.assert_close(task.loss(model, plain), clip_loss(images, texts, model.readout.scale("retrieval")))
        assert task.loss(model, batch) > task.loss(model, plain)
        # captions without a grouped word give no negatives, and the loss (on the same path) is the plain one
        bare = task.format_batch([{**sample, "caption": f"a {name} box"} for sample, name in zip(samples, COLOURS)])
        assert bare["negative_texts"] == [] and bare["negative_owners"] == []
        torch.testing.assert_close(margin.loss(model, bare), clip_loss(
            images, model.encode_text(bare["texts"]), model.readout.scale("retrieval")))


def test_retrieval_overfits_four_pairs(new_model):
    model = new_model(0)
    task = tasks.get_task("retrieval")
    captions = [f"a {name} square" for name in COLOURS]
    batch = task.format_batch([{"image": image, "caption": caption}
                               for image, caption in zip(colour_images(), captions)])
    assert batch["images"].shape == (4, 3, 64, 64) and batch["texts"] == captions
    losses = overfit(model, task, batch, steps=40)
    assert losses[-1] < 0.5 * losses[0], losses
    assert task.predict(model, batch) == [0, 1, 2, 3]
    assert task.predict_text_to_image(model, batch) == [0, 1, 2, 3]
    # The loss is open_clip's on the model's own embeddings and retrieval temperature.
    with torch.no_grad():
        image_embeddings, text_embeddings = model.encode_image(batch["images"]), model.encode_text(captions)
        logits = model.readout.scale("retrieval") * image_embeddings @ text_embeddings.T
        expected = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
        torch.testing.assert_close(task.loss(model, batch), expected)


def test_classification_overfits_four_classes(new_model):
    model = new_model(1)
    names = list(COLOURS)
    task = tasks.get_task("classification", class_names=names, templates=["a photo of a {}.", "a {} thing."])
    # Labels may be indices or class names.
    batch = task.format_batch([{"image": image, "label": name if i % 2 else i}
                               for i, (image, name) in enumerate(zip(colour_images(), names))])
    assert batch["labels"].tolist() == [0, 1, 2, 3] and batch["class_names"] == names
    losses = overfit(model, task, batch, steps=40)
    assert losses[-1] < 0.5 * losses[0], losses
    assert task.predict(model, batch) == [0, 1, 2, 3]
    # The model's zero-shot front-end agrees with the task on the trained model.
    assert model.classify(batch["images"], names, task.templates).argmax(-1).tolist() == [0, 1, 2, 3]
    # Precomputed class embeddings give the same predictions.
    with torch.no_grad():
        embeddings = model.class_embeddings(names, task.templates)
    assert task.predict(model, {"images": batch["images"], "class_embeddings": embeddings}) == [0, 1, 2, 3]


def test_classification_label_smoothing_and_batch_errors():
    task = ClassificationTask(class_names=["cat", "dog"])
    assert task.label_smoothing == 0.1 and task.templates == ["a photo of a {}."]
    with pytest.raises(ValueError, match="not one of the 2 class names"):
        task.format_batch([{"image": torch.zeros(3, 8, 8), "label": "cow"}])
    with pytest.raises(KeyError, match=r"sample 0 lacks \['label'\]"):
        task.format_batch([{"image": torch.zeros(3, 8, 8)}])
    with pytest.raises(ValueError, match="needs one '{}'"):
        ClassificationTask(templates=["a photo"])
    # PIL images go through the evaluation preprocessing at the task's image size.
    pil = Image.fromarray(np.full((40, 50, 3), 128, dtype=np.uint8))
    batch = ClassificationTask(class_names=["cat"], image_size=32).format_batch([{"image": pil, "label": 0}])
    assert batch["images"].shape == (1, 3, 32, 32)


def test_imagenet_class_names_and_templates_come_from_open_clip():
    names = imagenet_class_names()
    # open_clip's cleaned-up names repeat two: "missile" (657, 744) and "sunglasses" (836, 837).
    assert len(names) == 1000 and names[0] == "tench" and len(set(names)) == 998
    templates = imagenet_templates()
    assert len(templates) == 80 and templates[0].format("cat") == "a bad photo of a cat."
    assert len(imagenet_templates("simple")) == 7
    task = ClassificationTask(class_names="imagenet", templates="imagenet")
    assert len(task.class_names) == 1000 and len(task.templates) == 80
