"""Captioning and VQA tasks: incremental decoding with the key/value cache gives the logits of the parallel
teacher-forced forward, greedy decoding is the brute-force argmax, beam search finds better (and, with enough
beams, the best) sequences, padding in a batch changes no sample, the VQAv2 answer list, and tiny models that
overfit a handful of examples for captioning, ranked VQA and open-ended VQA."""
import functools
import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from tasks import get_task, list_tasks
from tasks.captioning import caption_vocabulary
from tasks.vqa import normalize_answer, vqav2_answer_list
from uniperceiver.generation import incremental_logits, search
from uniperceiver.model import UniPerceiver, tiny_config
from uniperceiver.tiny_text_model import build_tiny_text_model
from tiny_model import offline_cache  # noqa: F401 (a fixture)

BACKBONE = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), drop_path_rate=0.0, dcn_backend="reference")
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white star"]  # "white" is four tokens
COLOURS = torch.tensor([[1.0, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]])  # corners of a tetrahedron
# Two images, two questions: the answer needs both.
QUESTIONS = ["what colour is the shape?", "what shape is it?"] * 2
VQA_ANSWERS = ["red", "circle", "blue", "square"]
ANSWER_LIST = ["red", "blue", "green", "circle", "square", "yes", "no"]


pytestmark = pytest.mark.usefixtures("offline_cache")


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(str(build_tiny_text_model()))


def make_model(seed: int = 0, texts=None, dtype=torch.float32, text_mode: str = "full") -> UniPerceiver:
    """A tiny model; `texts` restrict the caption vocabulary to their tokens. No layer scale, so that the
    blocks matter from the start (the equivalence tests could not fail otherwise, and training is faster)."""
    config = dict(image=dict(backbone_overrides=BACKBONE), decoder=dict(layer_scale_init=None),
                  text=dict(mode=text_mode))
    if texts is not None:
        config["caption_vocab"] = caption_vocabulary(tiny_tokenizer(), texts)
    torch.manual_seed(seed)
    return UniPerceiver(tiny_config(**config)).to(dtype).eval()


def images(colours: torch.Tensor, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Solid colours plus noise, 64 x 64."""
    noise = torch.randn(len(colours), 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return (colours[:, :, None, None] + 0.3 * noise).to(dtype)


@pytest.fixture(scope="module")
def random_model() -> UniPerceiver:
    """An untrained model in float64 with a 10-token caption vocabulary."""
    return make_model(seed=1, texts=CAPTIONS, dtype=torch.float64)


def sequence_log_prob(model, image: torch.Tensor, indices: list[int], prompt=None) -> float:
    """Total log-probability of a word sequence under the teacher-forced parallel forward."""
    with torch.no_grad():
        logits = model.caption_logits(image, torch.tensor([indices]), torch.tensor([len(indices)]),
                                      prompts=None if prompt is None else [prompt])
    log_probs = logits[0].log_softmax(dim=-1)
    return float(sum(log_probs[j, w] for j, w in enumerate(indices)))


def cut_at_eos(indices: list[int], eos: int) -> list[int]:
    return indices[: indices.index(eos) + 1] if eos in indices else indices


def eos_index(model) -> int:
    return model.caption_vocab.tolist().index(model.tokenizer.eos_token_id)


# ------------------------------------------------------------------------------------ the caption vocabulary
def test_caption_vocabulary_restricts_the_candidates():
    model = make_model(texts=CAPTIONS)
    tokenizer = model.tokenizer
    vocab = caption_vocabulary(tokenizer, CAPTIONS)
    tokens = {t for caption in CAPTIONS for t in tokenizer(caption, add_special_tokens=False)["input_ids"]}
    expected = tokens | {tokenizer.eos_token_id}
    assert vocab == sorted(expected) and model.caption_vocab.tolist() == vocab
    indices, lengths = model.caption_token_ids(CAPTIONS[:2])
    assert lengths.tolist() == [4, 4] and indices[:, -1].tolist() == [eos_index(model)] * 2
    with torch.no_grad():
        assert model.caption_logits(images(COLOURS[:2]), indices, lengths).shape == (2, 4, len(vocab))
    with pytest.raises(ValueError, match="purple"):
        model.caption_token_ids(["a purple circle"])


# ---------------------------------------------------------------------- incremental decoding == full forward
@pytest.mark.parametrize("prompted", [False, True], ids=["caption", "question-prompt"])
def test_incremental_decoding_equals_the_parallel_forward(random_model, prompted):
    model = random_model
    pixels = images(COLOURS[:2], dtype=torch.float64)
    indices, lengths = model.caption_token_ids(["a red circle", "a star"])  # lengths 4 and 3: padding
    prompts = ["what colour is the shape?", "what?"] if prompted else None   # prompt padding too
    with torch.no_grad():
        parallel = model.caption_logits(pixels, indices, lengths, prompts=prompts)
    step_by_step = incremental_logits(model, pixels, indices, prompts=prompts)
    assert step_by_step.shape == parallel.shape == (2, 4, len(model.caption_vocab))
    for i, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(step_by_step[i, :length], parallel[i, :length], rtol=0, atol=1e-9)
    assert parallel.std() > 0.1  # the logits are not trivially equal


def test_padding_in_a_batch_changes_no_sample(random_model):
    """Positions count real tokens only: a short question gives the same results alone and next to a long one."""
    model = random_model
    pixels = images(COLOURS[:2], dtype=torch.float64)
    short, long = "what?", "what colour is the shape of the object?"
    indices, lengths = model.caption_token_ids(["a red circle", "a star"])
    with torch.no_grad():
        torch.testing.assert_close(model.vqa_query(pixels[:1], [short])[0],
                                   model.vqa_query(pixels, [short, long])[0], rtol=0, atol=1e-9)
        alone = model.caption_logits(pixels[:1], indices[:1], lengths[:1], prompts=[short])
        batched = model.caption_logits(pixels, indices, lengths, prompts=[short, long])
    torch.testing.assert_close(alone[0], batched[0], rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------ greedy and beams
def test_greedy_is_the_brute_force_argmax(random_model):
    model, eos = random_model, eos_index(random_model)
    pixels = images(COLOURS[:2], dtype=torch.float64)
    greedy = search(model, pixels, beams=1, max_length=5).word_indices
    for i in range(2):
        words = []
        with torch.no_grad():
            for j in range(5):  # re-run the whole forward without a cache; the last word is a placeholder
                logits = model.caption_logits(pixels[i:i + 1], torch.tensor([words + [0]]), torch.tensor([j + 1]))
                words.append(int(logits[0, j].argmax()))
                if words[-1] == eos:
                    break
        assert cut_at_eos(greedy[i].tolist(), eos) == words


def test_beam_search_scores_at_least_greedy(random_model):
    model, eos = random_model, eos_index(random_model)
    pixels = images(COLOURS[:2], dtype=torch.float64)
    greedy = search(model, pixels, beams=1, max_length=5)
    beam = search(model, pixels, beams=3, max_length=5)
    for i in range(2):
        for result in (greedy, beam):  # the reported score is the sequence's teacher-forced log-probability
            words = cut_at_eos(result.word_indices[i].tolist(), eos)
            assert math.isclose(float(result.scores[i]), sequence_log_prob(model, pixels[i:i + 1], words),
                                abs_tol=1e-9)
        assert float(beam.scores[i]) >= float(greedy.scores[i]) - 1e-12


def test_beam_search_with_every_prefix_kept_finds_the_best_sequence():
    """4 candidates, length 3: 16 beams keep every two-word prefix, so the search is exhaustive."""
    model = make_model(seed=2, texts=["a red circle"], dtype=torch.float64)
    vocab, eos = len(model.caption_vocab), eos_index(model)
    pixels = images(COLOURS[:1], dtype=torch.float64)
    assert vocab == 4
    with torch.no_grad():  # the log-probabilities of every word after every two-word prefix, in one pass
        prefixes = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
        words = torch.cat([prefixes, torch.zeros(len(prefixes), 1, dtype=torch.long)], 1)
        log_probs = model.caption_logits(pixels.expand(len(words), -1, -1, -1), words,
                                         torch.full((len(words),), 3)).log_softmax(-1)
    best, best_score = None, -math.inf
    for row, (a, b) in enumerate(prefixes.tolist()):
        for c in range(vocab):
            sequence = cut_at_eos([a, b, c], eos)
            score = sum(float(log_probs[row, j, w]) for j, w in enumerate(sequence))
            if score > best_score:
                best, best_score = sequence, score
    result = search(model, pixels, beams=vocab ** 2, max_length=3)
    assert cut_at_eos(result.word_indices[0].tolist(), eos) == best
    assert math.isclose(float(result.scores[0]), best_score, abs_tol=1e-9)


# ------------------------------------------------------------------------------------------------ overfitting
def overfit(model, task, batch, steps: int, lr: float = 1e-3) -> list[float]:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_captioning_overfits_four_images():
    model, task = make_model(texts=CAPTIONS), get_task("captioning")
    batch = task.format_batch([{"image": image, "caption": [caption, "a shape"]}
                               for image, caption in zip(images(COLOURS), CAPTIONS)])
    assert batch["captions"] == CAPTIONS and batch["references"][0] == ["a red circle", "a shape"]
    losses = overfit(model, task, batch, steps=60)
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    assert task.predict(model, batch) == CAPTIONS
    assert get_task("captioning", beams=3).predict(model, batch) == CAPTIONS


def vqa_batch(task):
    pixels = images(COLOURS[:2].repeat_interleave(2, dim=0))  # red circle, red circle, blue square, blue square
    return task.format_batch([{"image": image, "question": q, "answer": a}
                              for image, q, a in zip(pixels, QUESTIONS, VQA_ANSWERS)])


# A frozen (random) text encoder for VQA: fine-tuning the tiny Llama end to end on four questions tends to
# collapse the two questions together, and the decoder alone has to learn to read them here.
def test_vqa_ranking_overfits_four_questions():
    model, task = make_model(text_mode="frozen"), get_task("vqa", answer_list=ANSWER_LIST)
    batch = vqa_batch(task)
    assert task.targets(batch).tolist() == [0, 3, 1, 4]
    losses = overfit(model, task, batch, steps=100, lr=2e-3)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert task.predict(model, batch) == VQA_ANSWERS


def test_open_ended_vqa_overfits_four_questions():
    model, task = make_model(texts=ANSWER_LIST, text_mode="frozen"), get_task("vqa", mode="generate")
    batch = vqa_batch(task)
    losses = overfit(model, task, batch, steps=80, lr=2e-3)
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    assert task.predict(model, batch) == VQA_ANSWERS
    assert model.answer(batch["images"][:1], ["what shape is it?"]) == ["circle"]


def grouped_vqa_samples():
    """The two pictures of `vqa_batch`, each with both of its questions (as the shapes data gives whole pictures)."""
    pixels = images(COLOURS[:2])
    return [{"image": pixels[i], "questions": QUESTIONS[2 * i:2 * i + 2], "qa_answers": VQA_ANSWERS[2 * i:2 * i + 2]}
            for i in range(2)]


def test_grouped_vqa_batch_equals_the_one_question_per_picture_batch(random_model):
    """Every question of a picture in one batch: the picture's tokens are computed once and the queries, the loss
    and the predictions are those of the batch that repeats the picture for each question."""
    task = get_task("vqa", answer_list=ANSWER_LIST)
    samples = grouped_vqa_samples()
    grouped = task.format_batch(samples)
    flat = task.format_batch([{"image": sample["image"], "question": q, "answer": a}
                              for sample in samples for q, a in zip(sample["questions"], sample["qa_answers"])])
    assert grouped["image_index"] == [0, 0, 1, 1] and grouped["images"].shape[0] == 2
    assert grouped["questions"] == flat["questions"] and grouped["answers"] == flat["answers"]
    model = random_model
    calls = []
    hook = model.image_encoder.backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            queries = model.vqa_query(grouped["images"].double(), grouped["questions"],
                                      image_index=grouped["image_index"])
    finally:
        hook.remove()
    assert calls == [2]  # one backbone pass over the two pictures, not four
    with torch.no_grad():
        repeated = model.vqa_query(flat["images"].double(), flat["questions"])
        torch.testing.assert_close(queries, repeated, rtol=0, atol=1e-9)
        grouped64 = {**grouped, "images": grouped["images"].double()}
        flat64 = {**flat, "images": flat["images"].double()}
        torch.testing.assert_close(task.loss(model, grouped64), task.loss(model, flat64), rtol=0, atol=1e-9)
    assert task.predict(model, grouped64) == task.predict(model, flat64)


def test_grouped_vqa_batch_errors_name_the_sample_and_the_index(random_model):
    task = get_task("vqa", answer_list=ANSWER_LIST)
    samples = grouped_vqa_samples()
    samples[1]["qa_answers"] = ["blue"]
    with pytest.raises(ValueError, match="sample 1 needs lists 'questions' and 'qa_answers' of one length"):
        task.format_batch(samples)
    with pytest.raises(ValueError, match="no picture of the batch has a question"):
        task.format_batch([{"image": images(COLOURS[:1])[0], "questions": [], "qa_answers": []}])
    with pytest.raises(ValueError, match=r"image_index must be .* in \[0, 2\)"):
        random_model.vqa_query(images(COLOURS[:2], dtype=torch.float64), QUESTIONS, image_index=[0, 1, 2, 1])


# ------------------------------------------------------------------------------------------- tasks and data
def test_tasks_are_registered_with_their_families():
    assert {"captioning", "vqa"} <= set(list_tasks())
    assert get_task("captioning").family == "caption" and get_task("vqa").family == "vqa"
    with pytest.raises(ValueError, match="mode"):
        get_task("vqa", mode="choose")
    task = get_task("vqa", answer_list=["red"])
    with pytest.raises(ValueError, match="blue"):
        task.targets({"answers": ["blue"]})
    with pytest.raises(ValueError, match="answer list"):
        get_task("vqa").targets({"answers": ["red"]})
    with pytest.raises(KeyError, match="question"):
        task.format_batch([{"image": torch.zeros(3, 8, 8), "answer": "red"}])


def test_vqav2_answer_list_counts_multiple_choice_answers(tmp_path):
    answers = ["yes"] * 4 + ["Yes."] + ["2"] * 3 + ["no"] * 3 + ["red"] * 2 + ["blue"]
    path = tmp_path / "v2_mscoco_train2014_annotations.json"
    path.write_text(json.dumps({"annotations": [{"question_id": i, "multiple_choice_answer": a,
                                                 "answers": [{"answer": a, "answer_id": 1}]}
                                                for i, a in enumerate(answers)]}))
    assert vqav2_answer_list(path) == ["yes", "2", "no", "red", "blue"]  # ties alphabetical
    assert vqav2_answer_list(path, top_k=3) == ["yes", "2", "no"]
    assert vqav2_answer_list([path, path], top_k=1) == ["yes"]
    assert normalize_answer("  Two  Dogs. ") == "two dogs"

    with pytest.raises(FileNotFoundError, match="missing.json"):
        vqav2_answer_list(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        vqav2_answer_list(broken)
    wrong = tmp_path / "questions.json"
    wrong.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="questions.json.*'annotations'"):
        vqav2_answer_list(wrong)
    wrong.write_text(json.dumps({"annotations": [{"answers": []}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\]"):
        vqav2_answer_list(wrong)
