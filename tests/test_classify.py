"""launch/classify.py: a tiny InternImage trains on a generated image folder, its checkpoint resumes exactly,
its exported weights load back, and bad input gives clear errors."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internimage import create_model
from internimage.checkpoint import load_checkpoint

from launch_script import LAUNCH, load_launch_script

SCRIPT = LAUNCH / "classify.py"
TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}


classify = load_launch_script("classify")


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
    load_checkpoint(exported, output / "model.safetensors")
    checkpointed.load_state_dict(torch.load(output / "checkpoint-last.pt", weights_only=False)["model"])
    with torch.no_grad():
        torch.testing.assert_close(exported(images), checkpointed(images), rtol=0, atol=0)

    # Evaluating the exported weights reproduces the run's final evaluation.
    again = classify.main(tiny_args(image_folder, tmp_path / "eval", "--eval-only", "--pretrained",
                                    str(output / "model.safetensors")))
    assert again["eval"] == pytest.approx(result["eval"])


def test_resume_continues_exactly(image_folder, tmp_path):
    """6 steps straight == 3 steps, stop, resume to 6: same losses and bit-identical weights, EMA and
    optimiser state, across an epoch boundary and with mixup/cutmix, drop path and EMA drawing randomness."""
    extra = ["--epochs", "2", "--batch-size", "12", "--drop-path", "0.2", "--model-ema", "--model-ema-decay", "0.9"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    classify.main(tiny_args(image_folder, straight, *extra, "--max-steps", "6"))
    first = classify.main(tiny_args(image_folder, split, *extra, "--max-steps", "3"))
    assert first["step"] == 3
    assert torch.load(split / "checkpoint-last.pt", weights_only=False)["step"] == 3
    classify.main(tiny_args(image_folder, split, *extra, "--max-steps", "6", "--resume", "--workers", "2"))

    split_steps = read_log(split, "step")
    assert [line["step"] for line in split_steps] == [1, 2, 3, 4, 5, 6]
    assert [line["loss"] for line in split_steps] == [line["loss"] for line in read_log(straight, "step")]
    a = torch.load(straight / "checkpoint-last.pt", weights_only=False)
    b = torch.load(split / "checkpoint-last.pt", weights_only=False)
    assert (a["epoch"], a["batch_in_epoch"], a["step"]) == (b["epoch"], b["batch_in_epoch"], b["step"]) == (1, 2, 6)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(argv: list[str], world_size: int = 2) -> None:
    """What the deepspeed launcher does on one machine: one process per rank, told its rank by the environment."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"


def test_deepspeed_zero3_on_two_cpu_ranks_resumes_and_exports(tmp_path):
    """ZeRO-3 over two gloo ranks: sharded batches, an odd-sized validation split evaluated exactly once (padded
    so both ranks run the same number of forward passes), the engine's checkpoint resumed, fp32 weights exported."""
    pytest.importorskip("deepspeed")
    data = write_image_folder(tmp_path / "data", train=16, val=3)
    output = tmp_path / "run"
    argv = tiny_args(data, output, "--deepspeed", "--zero-stage", "3", "--device", "cpu", "--batch-size", "4",
                     "--epochs", "1", "--mixup", "0", "--cutmix", "0")
    run_ranks([*argv, "--max-steps", "3"])
    run_ranks([*argv, "--resume"])
    assert [line["step"] for line in read_log(output, "step")] == [1, 2, 3, 4, 5, 6]  # 48 images / 2 ranks / 4
    assert read_log(output, "epoch")[0]["eval"]["count"] == 9
    assert sorted(p.name for p in (output / "deepspeed").iterdir() if p.is_dir()) == ["step00000006"]
    report = load_checkpoint(tiny_model(), output / "model.safetensors")
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
    checkpoint = torch.load(tmp_path / "run" / "checkpoint-last.pt", weights_only=False)
    assert checkpoint["classes"] == names

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
    with pytest.raises(FileNotFoundError, match=r"--resume .*checkpoint-last.pt: no such checkpoint"):
        classify.main(tiny_args(image_folder, tmp_path / "fresh", "--resume"))


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
    ids, head_id = classify.layer_ids(model)
    assert head_id == 6
    assert ids["patch_embed.conv1.weight"] == 0
    assert [ids[f"levels.2.blocks.{j}.mlp.fc1.weight"] for j in (0, 1)] == [3, 4]
    assert ids["levels.0.downsample.conv.weight"] == ids["levels.0.norm.0.weight"] == 1
    assert ids["levels.2.downsample.conv.weight"] == 4 and ids["levels.3.blocks.0.dcn.offset.weight"] == 5
    assert ids["head.weight"] == ids["conv_head.0.weight"] == 6

    groups = classify.param_groups(model, weight_decay=0.05, layer_decay=0.5)
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
    assert "new head for 3 classes" in classify.load_pretrained(target, str(tmp_path / "five.safetensors"))
    assert torch.equal(target.levels[2].blocks[1].dcn.offset.weight, source.levels[2].blocks[1].dcn.offset.weight)
    assert torch.equal(target.head.weight, head)

    wider = create_model("internimage_t", num_classes=5, dcn_backend="reference", **{**TINY, "channels": 32})
    with pytest.raises(CheckpointError, match="shape mismatches"):  # another variant: still the loader's error
        classify.load_pretrained(wider, str(tmp_path / "five.safetensors"))
