"""launch/pretrain.py: a short multitask run on a small shapes dataset checkpoints, exports and logs; a resumed run
repeats the uninterrupted one exactly; SIGTERM checkpoints and exits cleanly; override typos and non-finite losses
give clear messages; DeepSpeed ZeRO-2 runs in one CPU process."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import pretrain, pretraining
from launch.training.checkpoints import RunFolder
from launch.training.loop import TrainingStopped
from launch.training.recipe import load_recipe
from launch.training.runtime import Runtime

from pretrain_runs import model_state, read_log, small_overrides

SCRIPT = Path(pretrain.__file__)
pytestmark = pytest.mark.usefixtures("module_cache")


def run(output: Path, *extra: str, steps: int = 6, overrides: dict | None = None) -> dict:
    return pretrain.main(["--output", str(output), "--no-eval", "--no-progress", *extra,
                          *small_overrides(steps, **(overrides or {}))])


def step_lines(output: Path) -> list[dict]:
    return read_log(output, "step")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("straight")
    run(output)
    return output


def test_run_writes_checkpoints_export_logs_and_loss_curve(straight_run):
    from uniperceiver import UniPerceiver

    steps = step_lines(straight_run)
    assert [line["step"] for line in steps] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(line["loss"]) for line in steps)
    assert len({line["task"] for line in steps}) >= 2  # unmixed: one task per step, several over the run
    checkpoints = straight_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000003", "step_000006"]
    assert (checkpoints / "latest").read_text() == "step_000006"
    assert not list(checkpoints.glob(".tmp-*"))
    model = UniPerceiver.from_pretrained(straight_run / "export")
    trained = model_state(straight_run, 6)
    for key, value in model.state_dict().items():
        # the export's UNet is the checkpoint's EMA of it (what sampling uses); its EMA starts again from there
        if key in trained and not key.startswith(("diffusion.unet.", "diffusion.ema_")):
            torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    for i, value in enumerate(model.diffusion.unet.parameters()):
        torch.testing.assert_close(value.detach(), trained[f"diffusion.ema_{i}"], rtol=0, atol=0)
    assert model.config.caption_vocab is not None and len(model.config.caption_vocab) < len(model.tokenizer)
    assert UniPerceiver.from_pretrained(checkpoints / "step_000003" / "export") is not None
    assert list((straight_run / "tb").glob("events.out.tfevents.*"))
    assert (straight_run / "loss_curve.png").stat().st_size > 1000


def test_resume_repeats_the_uninterrupted_run_exactly(straight_run, tmp_path):
    output = tmp_path / "resumed"
    first = run(output, "--stop-after", "3")
    assert first["step"] == 3 and (output / "checkpoints" / "latest").read_text() == "step_000003"
    run(output, "--resume")
    straight, resumed = step_lines(straight_run), step_lines(output)
    assert [(l["step"], l["task"], l["loss"]) for l in resumed] == [(l["step"], l["task"], l["loss"]) for l in straight]
    expected, got = model_state(straight_run, 6), model_state(output, 6)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tmp_path):
    output = tmp_path / "signalled"
    argv = [sys.executable, str(SCRIPT), "--output", str(output), "--no-eval", "--no-progress",
            *small_overrides(200, **{"checkpoint.every_steps": 0})]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="2"))
    log = output / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and log.read_text().strip()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: checkpointed at step" in out
    stopped_at = step_lines(output)[-1]["step"]
    assert 1 <= stopped_at < 200
    assert (output / "checkpoints" / "latest").read_text() == f"step_{stopped_at:06d}"
    result = run(output, "--resume", "--stop-after", str(stopped_at + 2), steps=200,
                 overrides={"checkpoint.every_steps": 0})
    assert result["step"] == stopped_at + 2
    assert [line["step"] for line in step_lines(output)] == list(range(1, stopped_at + 3))


def test_unknown_override_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'optimizer.learning_rate'"):
        pretrain.main(["--output", str(tmp_path), "optimizer.learning_rate=1e-3"])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output", str(tmp_path), "stepz=3"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown key 'stepz'" in proc.stderr, proc.stderr[-2000:]


def _nan_losses(monkeypatch, bad_calls: set[int] | None):
    """Every task's loss returns NaN on the given calls (counted from 1; None: from the second on)."""
    import tasks

    calls = {"n": 0}
    for name in tasks.list_tasks():
        cls = type(tasks.get_task(name, **({"class_names": ["a"]} if name == "classification" else {})))
        original = cls.loss

        def loss(self, model, batch, _original=original):
            calls["n"] += 1
            value = _original(self, model, batch)
            bad = calls["n"] >= 2 if bad_calls is None else calls["n"] in bad_calls
            return value * float("nan") if bad else value

        monkeypatch.setattr(cls, "loss", loss)


def test_nonfinite_losses_are_skipped_and_logged(tmp_path, monkeypatch):
    _nan_losses(monkeypatch, {2, 3})
    output = tmp_path / "nan"
    result = run(output, overrides={"max_nonfinite_steps": 3, "checkpoint.every_steps": 1, "checkpoint.keep": 6})
    assert result["step"] == 6
    lines = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [(l["step"], l["consecutive"]) for l in lines if l["event"] == "nonfinite"] == [(2, 1), (3, 2)]
    assert [l["step"] for l in lines if l.get("skipped")] == [2, 3]
    assert all(math.isfinite(l["loss"]) for l in lines if l["event"] == "step" and l["step"] not in (2, 3))
    # a skipped step changes no weight: step 3's checkpoint holds step 1's weights, step 4's differ
    after_1, after_3, after_4 = (model_state(output, step) for step in (1, 3, 4))
    for key in after_1:
        torch.testing.assert_close(after_3[key], after_1[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(after_4[key], after_1[key]) for key in after_1)


def test_repeated_nonfinite_losses_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    _nan_losses(monkeypatch, None)
    with pytest.raises(TrainingStopped, match="3 consecutive steps had a non-finite loss"):
        run(tmp_path / "nan-stop", overrides={"max_nonfinite_steps": 3})


def test_deepspeed_zero2_in_one_cpu_process_matches_the_plain_loop(straight_run, tmp_path):
    pytest.importorskip("deepspeed")
    from uniperceiver import UniPerceiver

    output = tmp_path / "zero2"
    argv = [sys.executable, str(SCRIPT), "--output", str(output), "--no-eval", "--no-progress",
            *small_overrides(3, **{"deepspeed.zero_stage": 2})]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    plain, zero = step_lines(straight_run)[:3], step_lines(output)
    assert [l["task"] for l in zero] == [l["task"] for l in plain]
    # the same first step (same data, same initial weights); later steps follow another lr schedule (3 steps)
    assert zero[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    assert (output / "checkpoints" / "step_000003" / "engine").is_dir()
    assert UniPerceiver.from_pretrained(output / "export") is not None


def test_encoders_train_at_the_scaled_learning_rate(tmp_path):
    """optimizer.encoder_lr_scale: the backbone and the language model step at lr * scale, the rest at lr."""
    recipe = load_recipe("tiny", small_overrides(2, **{"optimizer.encoder_lr_scale": 0.25}))
    runtime = Runtime(torch.device("cpu"))
    trainer = pretraining.build_trainer(recipe, runtime, RunFolder(tmp_path, runtime, "pretrain"))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    stats = pretraining.train_step(trainer)
    encoder_ids = {id(p) for module in trainer.model.encoder_modules() for p in module.parameters()}
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    groups = trainer.optimizer.param_groups
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in trainable)
    assert any(id(p) in encoder_ids for p in trainable) and any(id(p) not in encoder_ids for p in trainable)
    for group in groups:
        in_encoder = {id(p) in encoder_ids for p in group["params"]}
        assert len(in_encoder) == 1, "a group mixes encoder and non-encoder parameters"
        assert group["lr"] == pytest.approx(stats["lr"] * (0.25 if in_encoder.pop() else 1.0))
    moved = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert any(name.startswith("image_encoder.backbone.") for name in moved)
    assert any(name.startswith("decoder.") for name in moved)


def test_the_diffusion_branch_trains_at_its_scaled_learning_rate(tmp_path):
    """optimizer.diffusion_lr_scale: the text-to-image branch steps at lr * scale, beside the encoders' scale."""
    recipe = load_recipe("tiny", small_overrides(2, **{"optimizer.encoder_lr_scale": 0.25,
                                                       "optimizer.diffusion_lr_scale": 3.0}))
    runtime = Runtime(torch.device("cpu"))
    trainer = pretraining.build_trainer(recipe, runtime, RunFolder(tmp_path, runtime, "pretrain"))
    stats = pretraining.train_step(trainer)
    model = trainer.model
    kind = {id(p): "encoder" for module in model.encoder_modules() for p in module.parameters()}
    kind.update({id(p): "diffusion" for p in model.diffusion.unet.parameters()})
    groups = trainer.optimizer.param_groups
    assert sorted(id(p) for g in groups for p in g["params"]) == \
        sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert all(g["fused"] for g in groups)  # every parameter of the model takes the fused AdamW kernel
    seen = set()
    for group in groups:
        kinds = {kind.get(id(p), "decoder") for p in group["params"]}
        assert len(kinds) == 1, f"group {group['name']} mixes {kinds}"
        seen |= kinds
        assert group["lr"] == pytest.approx(stats["lr"] * {"encoder": 0.25, "diffusion": 3.0, "decoder": 1.0}[kinds.pop()])
    assert seen == {"encoder", "diffusion", "decoder"}
    with pytest.raises(ValueError, match=r"optimizer.diffusion_lr_scale: expected > 0, got 0"):
        load_recipe("tiny", ["optimizer.diffusion_lr_scale=0"])
    without_branch = load_recipe("tiny", ["optimizer.encoder_lr_scale=1", "optimizer.diffusion_lr_scale=2"])
    with pytest.raises(ValueError, match=r"optimizer.diffusion_lr_scale=2.0: the model has no text-to-image branch"):
        pretraining.scaled_lr_groups(torch.nn.Linear(2, 2), without_branch)


@pytest.mark.parametrize("key", ["encoder_lr_scale", "diffusion_lr_scale"])
def test_lr_scales_with_tbgn_under_zero_are_refused(key):
    recipe = load_recipe("tiny", ["optimizer.name=tbgn", "optimizer.encoder_lr_scale=1", f"optimizer.{key}=0.1",
                                  "deepspeed.zero_stage=2"])
    runtime = Runtime(torch.device("cpu"), deepspeed=object())
    with pytest.raises(ValueError, match=rf"optimizer.{key}=0.1: TBGN under ZeRO stage 2"):
        pretraining.make_optimizer(torch.nn.Linear(2, 2), recipe, runtime)


def test_the_tiny_recipe_learns_within_a_few_hundred_steps(tmp_path):
    """The tiny recipe on the full shapes train split: the contrastive losses leave chance level, log(batch) for
    retrieval and log(6) for classification. Randomly initialised encoders at the decoder's learning rate (or the
    old 0.02 decoder init at width 64) kept both at exactly chance for hundreds of steps."""
    steps = 375  # 300 steps of the five ranking and generation tasks, 75 of text to image
    result = pretrain.main(["--output", str(tmp_path), "--no-eval", "--no-progress", f"steps={steps}",
                            "optimizer.warmup_steps=40", "checkpoint.every_steps=0",
                            "model.image.backbone_overrides.dcn_backend=reference"] +
                           [f"tasks.{name}.eval_dataset=null" for name in ("retrieval", "classification",
                                                                            "captioning", "vqa", "detection",
                                                                            "text_to_image")])
    assert result["step"] == steps
    lines = step_lines(tmp_path)

    def late_mean(task: str, count: int) -> float:
        losses = [line["loss"] for line in lines if line["task"] == task]
        return sum(losses[-count:]) / count

    # The recipe's retrieval loss also ranks each picture against two negatives per caption and adds their
    # separation, so its chance level is above log(32): at least (log(32 + 64) + log(32)) / 2.
    assert late_mean("retrieval", 20) < (math.log(32 + 2 * 32) + math.log(32)) / 2
    # The plain contrastive loss of the trained model on 32 training pairs leaves chance, log(32).
    from eval.shapes import resolve_shapes_data
    from tasks.base import stack_images
    from tasks.retrieval import clip_loss
    from uniperceiver import UniPerceiver

    model = UniPerceiver.from_pretrained(tmp_path / "export").eval()
    rows = resolve_shapes_data("train", "shapes?train_size=6000")[0].select(range(32))
    with torch.no_grad():
        plain = clip_loss(model.encode_image(stack_images(rows["image"], 64)),
                          model.encode_text([captions[0] for captions in rows["captions"]]),
                          model.readout.scale("retrieval"), rank=0, world_size=1)
    assert plain < math.log(32) - 0.4
    assert late_mean("classification", 15) < math.log(6) - 0.2
    for task in ("detection", "text_to_image"):
        losses = [line["loss"] for line in lines if line["task"] == task]
        assert late_mean(task, 10) < 0.8 * sum(losses[:10]) / 10, task


def test_the_run_ends_with_the_test_split_and_the_held_out_style_side_by_side(tmp_path, capsys):
    """The zero-shot evaluation reads the test split in the training style and the same scenes drawn in the
    shifted style, each with the question-only baseline of the training data, prints one table with a column
    each, and writes both results and the picture grid."""
    result = pretrain.main(["--output", str(tmp_path), "--no-progress",
                            *small_overrides(2, **{"eval.samples_seeds": 1})])
    printed = capsys.readouterr().out
    assert "| metric | test | test, shifted style |" in printed
    assert (tmp_path / "eval_test.json").is_file() and (tmp_path / "eval_test_shifted.json").is_file()
    assert (tmp_path / "examples.png").is_file() and result["examples"] == tmp_path / "examples.png"
    shifted = json.loads((tmp_path / "eval_test_shifted.json").read_text())
    test = json.loads((tmp_path / "eval_test.json").read_text())
    assert shifted["counts"]["images"] == test["counts"]["images"] == 8
    # The same scenes, so the same words; the same prior, so the same question-only baseline.
    assert shifted["metrics"]["vqa/blind_baseline"] == test["metrics"]["vqa/blind_baseline"]
    assert set(result["eval"]["styles"]) == {"test", "test, shifted style"}
    # The recipe's model detects, so both columns hold box AP by pycocotools.
    for metrics in (test["metrics"], shifted["metrics"]):
        assert {"detection/AP", "detection/AP50", "detection/AP75"} <= set(metrics)
    assert "| detection/AP50 |" in printed
    # The recipe's model draws: the text-to-image suite judged by the model itself, and the prompts-by-seeds grid.
    drawn = json.loads((tmp_path / "eval_text_to_image.json").read_text())
    assert drawn["counts"]["seeds"] == 1 and drawn["counts"]["one_object_prompts"] == 30
    assert {"t2i/colour", "t2i/shape", "t2i/both", "t2i/two_objects"} <= set(drawn["metrics"])
    assert (tmp_path / "samples.png").stat().st_size > 1000 and "| t2i/colour |" in printed
