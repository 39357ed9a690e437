"""launch/classify.py: a tiny InternImage trains on a generated image folder, its checkpoint resumes exactly,
its exported weights load back, and bad input gives clear errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internimage import create_model
from internimage.checkpoint import load_checkpoint
from launch import classification, classify
from launch.training.checkpoints import RunFolderError

from pretrain_runs import run_ranks

SCRIPT = Path(classify.__file__)
TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}



def noisy_image(colour, rng: np.random.Generator, size: int = 32) -> Image.Image:
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_image_folder(root: Path, train: int, val: int) -> Path:
    """Three trivially separable classes (a colour each, with noise), `train` and `val` images per class."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noisy_image(colour, rng).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("folder"), train=16, val=8)


def tiny_args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--output", str(output), "--model-kwargs", "channels=16", "depths=1,1,2,1",
            "groups=1,2,4,8", "--img-size", "32", "--dcn-backend", "reference", "--batch-size", "8",
            "--workers", "0", "--no-progress", "--log-every-steps", "1", "--warmup-steps", "1", "--seed", "0", *extra]


def read_log(output: Path, event: str) -> list[dict]:
    lines = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if line["event"] == event]


def latest(output: Path) -> Path:
    checkpoints = output / "checkpoints"
    return checkpoints / (checkpoints / "latest").read_text()


def latest_state(output: Path) -> dict:
    """The newest checkpoint: its model and optimizer (state.pt), position (client.json) and EMA (extra.pt)."""
    folder = latest(output)
    state = torch.load(folder / "state.pt", weights_only=True)
    state.update(json.loads((folder / "client.json").read_text()))
    if (folder / "extra.pt").is_file():
        state.update(torch.load(folder / "extra.pt", weights_only=True))
    return state


def tiny_model(num_classes: int = 3) -> torch.nn.Module:
    return create_model("internimage_t", num_classes=num_classes, dcn_backend="reference", **TINY).eval()


def test_training_lowers_loss_and_exports_loadable_weights(image_folder, tmp_path):
    output = tmp_path / "run"
    result = classify.main(tiny_args(image_folder, output, "--epochs", "4", "--lr", "2e-3", "--mixup", "0",
                                     "--cutmix", "0", "--smoothing", "0", "--drop-path", "0"))
    losses = [line["loss"] for line in read_log(output, "step")]
    assert len(losses) == 4 * (48 // 8) == result["step"]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    assert len(read_log(output, "epoch")) == 4
    assert result["eval"]["count"] == 24 and result["eval"]["top1"] > 100 / 3 + 20, result["eval"]
    assert result["eval"]["top5"] == 100.0  # top-5 with 3 classes is top-3

    # model.safetensors and the checkpoint's model hold the same weights; both load into a fresh model.
    images = torch.randn(2, 3, 32, 32)
    exported, checkpointed = tiny_model(), tiny_model()
    load_checkpoint(exported, output / "export" / "model.safetensors")
    checkpointed.load_state_dict(latest_state(output)["model"])
    with torch.no_grad():
        torch.testing.assert_close(exported(images), checkpointed(images), rtol=0, atol=0)

    # Evaluating the exported weights reproduces the run's final evaluation.
    again = classify.main(tiny_args(image_folder, tmp_path / "eval", "--eval-only", "--pretrained",
                                    str(output / "export" / "model.safetensors")))
    assert again["eval"] == pytest.approx(result["eval"])


def test_resume_continues_exactly(image_folder, tmp_path):
    """6 steps straight == 3 steps, stop, resume to 6: same losses and bit-identical weights, EMA and
    optimiser state, across an epoch boundary and with mixup/cutmix, drop path and EMA drawing randomness."""
    extra = ["--epochs", "2", "--batch-size", "12", "--drop-path", "0.2", "--model-ema", "--model-ema-decay", "0.9"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    classify.main(tiny_args(image_folder, straight, *extra, "--max-steps", "6"))
    first = classify.main(tiny_args(image_folder, split, *extra, "--max-steps", "3"))
    assert first["step"] == 3
    assert latest_state(split)["step"] == 3
    classify.main(tiny_args(image_folder, split, *extra, "--max-steps", "6", "--resume", "--workers", "2"))

    split_steps = read_log(split, "step")
    assert [line["step"] for line in split_steps] == [1, 2, 3, 4, 5, 6]
    assert [line["loss"] for line in split_steps] == [line["loss"] for line in read_log(straight, "step")]
    a, b = latest_state(straight), latest_state(split)
    assert (a["epoch"], a["batch_in_epoch"], a["step"]) == (b["epoch"], b["batch_in_epoch"], b["step"]) == (1, 2, 6)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])


def test_deepspeed_zero3_on_two_cpu_ranks_resumes_and_exports(tmp_path):
    """ZeRO-3 over two gloo ranks: sharded batches, an odd-sized validation split evaluated exactly once (padded
    so both ranks run the same number of forward passes), the engine's checkpoint resumed, fp32 weights exported."""
    pytest.importorskip("deepspeed")
    data = write_image_folder(tmp_path / "data", train=16, val=3)
    output = tmp_path / "run"
    argv = tiny_args(data, output, "--deepspeed", "--zero-stage", "3", "--device", "cpu", "--batch-size", "4",
                     "--epochs", "1", "--mixup", "0", "--cutmix", "0")
    run_ranks([str(SCRIPT), *argv, "--max-steps", "3"], world_size=2)
    run_ranks([str(SCRIPT), *argv, "--resume"], world_size=2)
    assert [line["step"] for line in read_log(output, "step")] == [1, 2, 3, 4, 5, 6]  # 48 images / 2 ranks / 4
    assert read_log(output, "epoch")[0]["eval"]["count"] == 9
    assert sorted(p.name for p in (output / "checkpoints").iterdir() if p.is_dir()) == ["step_000003", "step_000006"]
    assert (latest(output) / "engine").is_dir()
    report = load_checkpoint(tiny_model(), output / "export" / "model.safetensors")
    assert len(report.loaded) == len(tiny_model().state_dict())


def test_hugging_face_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    names = sorted(COLOURS)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def split(count):
        rows = [(noisy_image(COLOURS[name], rng), label) for label, name in enumerate(names) for _ in range(count)]
        return datasets.Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]},
                                          features=features)

    datasets.DatasetDict({"train": split(8), "validation": split(2)}).save_to_disk(str(tmp_path / "hf"))
    result = classify.main(tiny_args(tmp_path / "hf", tmp_path / "run", "--epochs", "1", "--mixup", "0",
                                     "--cutmix", "0"))
    assert result["step"] == 24 // 8 and result["eval"]["count"] == 6
    assert latest_state(tmp_path / "run")["classes"] == names

    datasets.DatasetDict({"train": split(1)}).save_to_disk(str(tmp_path / "no_val"))
    with pytest.raises(ValueError, match=r"no_val: splits \['train'\]; expected train and one of validation/val/test"):
        classify.main(tiny_args(tmp_path / "no_val", tmp_path / "run2"))


def test_bad_data_paths_name_the_path_and_what_was_expected(image_folder, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such directory; expected an ImageFolder root with "
                                                r"train/ and val/"):
        classify.main(tiny_args(missing, tmp_path / "run"))
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"only_train: missing split folder\(s\) val/"):
        classify.main(tiny_args(tmp_path / "only_train", tmp_path / "run"))
    with pytest.raises(RunFolderError, match=r"--resume: no checkpoint in .*fresh.checkpoints to evaluate"):
        classify.main(tiny_args(image_folder, tmp_path / "fresh", "--resume", "--eval-only"))


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "7"], "--batch-size must be even"),
    (["--model-kwargs", "channels"], "expected a JSON object or key=value"),
    (["--model-kwargs", "num_classes=3"], "num_classes comes from the dataset"),
    (["--layer-decay", "1.5"], "--layer-decay must be in"),
    (["--eval-only"], "--eval-only needs weights"),
    (["--model", "internimage_q"], "invalid choice"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        classify.parse_args(["--data", "x", *argv])
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_model_kwargs_accept_json_and_key_value():
    args = classify.parse_args(["--data", "x", "--model-kwargs", '{"channels": 16, "layer_scale": 1e-5}',
                                "depths=1,1,2,1", "groups=[1,2,4,8]", "post_norm=true", "act_layer=GELU"])
    assert args.model_kwargs == dict(channels=16, layer_scale=1e-5, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8],
                                     post_norm=True, act_layer="GELU")


def test_layer_decay_and_weight_decay_groups():
    """BEiT-style depths: stem 0, blocks 1..5 in order, a level's norm/downsample with its last block, head 6."""
    model = tiny_model()
    ids, head_id = classification.layer_ids(model)
    assert head_id == 6
    assert ids["patch_embed.conv1.weight"] == 0
    assert [ids[f"levels.2.blocks.{j}.mlp.fc1.weight"] for j in (0, 1)] == [3, 4]
    assert ids["levels.0.downsample.conv.weight"] == ids["levels.0.norm.0.weight"] == 1
    assert ids["levels.2.downsample.conv.weight"] == 4 and ids["levels.3.blocks.0.dcn.offset.weight"] == 5
    assert ids["head.weight"] == ids["conv_head.0.weight"] == 6

    groups = classification.layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)
    assert by_param[id(named["patch_embed.conv1.weight"])]["lr_scale"] == 0.5 ** 6
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["head.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["head.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["levels.1.blocks.0.norm1.0.weight"])]["weight_decay"] == 0.0
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim <= 1 for p in g["params"]))


def test_pretrained_weights_for_other_classes_get_a_fresh_head(tmp_path):
    from internimage.checkpoint import CheckpointError
    from safetensors.torch import save_file

    source = tiny_model(num_classes=5)
    save_file(source.state_dict(), str(tmp_path / "five.safetensors"))
    target = tiny_model(num_classes=3)
    head = target.head.weight.clone()
    assert "new head for 3 classes" in classification.load_pretrained(target, str(tmp_path / "five.safetensors"))
    assert torch.equal(target.levels[2].blocks[1].dcn.offset.weight, source.levels[2].blocks[1].dcn.offset.weight)
    assert torch.equal(target.head.weight, head)

    wider = create_model("internimage_t", num_classes=5, dcn_backend="reference", **{**TINY, "channels": 32})
    with pytest.raises(CheckpointError, match="shape mismatches"):  # another variant: still the loader's error
        classification.load_pretrained(wider, str(tmp_path / "five.safetensors"))
