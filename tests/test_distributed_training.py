"""The engine under DeepSpeed on CPU processes (gloo): gradient accumulation at every ZeRO stage matches the plain
loop; two ranks under ZeRO-2 and ZeRO-3 match one process with the same global batch, and resume exactly; a NaN
on one rank only is skipped on every rank by both launchers; ClipLoss's gather keeps the gradient across ranks."""
import textwrap
from pathlib import Path

import pytest
import torch

from launch import pretrain

from pretrain_runs import exported_weights, read_log, run_ranks, small_overrides

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.usefixtures("module_cache")
SCRIPT = str(Path(pretrain.__file__))


def plain(output: Path, steps: int = 6, batch_size: int = 8, **overrides) -> Path:
    pretrain.main(["--output", str(output), "--no-eval", "--no-progress",
                   *small_overrides(steps, batch_size, **overrides)])
    return output


def comparable(key: str, weights: torch.Tensor) -> torch.Tensor:
    """The weights two implementations must agree on. The key bias of attention is left out: softmax ignores a
    shift shared by a query's scores, so its gradient is zero but for rounding, and Adam's normalisation turns
    that rounding into steps of full size (it differs by 1e-4 between any two summation orders, the query and
    value biases beside it by 1e-8)."""
    if key.endswith("attn.qkv.bias"):
        query, _, value = weights.chunk(3)
        return torch.cat([query, value])
    return weights


def assert_same_run(got: Path, expected: Path, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    a, b = read_log(got), read_log(expected)
    assert [l["task"] for l in a] == [l["task"] for l in b]
    for line, reference in zip(a, b):
        assert line["loss"] == pytest.approx(reference["loss"], rel=rtol), (line, reference)
    weights, reference = exported_weights(got), exported_weights(expected)
    assert weights.keys() == reference.keys()
    for key in reference:
        assert_close_but_for_adam_rounding(comparable(key, weights[key]), comparable(key, reference[key]), rtol,
                                           atol, key)


def assert_close_but_for_adam_rounding(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float,
                                       key: str, max_outliers: int = 2, outlier_atol: float = 1e-4) -> None:
    """Elementwise closeness, but for at most `max_outliers` elements a tensor that may be off by up to
    `outlier_atol` (10% of one step at the recipe's learning rate of 1e-3). Where an element's gradient is near
    zero, Adam divides rounding by the square root of rounding: two summation orders then give steps of different
    size for that one element (with a 24-channel backbone, 1 of the 4096 of text_encoder.proj.weight differed by
    1.5e-5, the others by 3e-8 or less; with the detection head, 1 of the 200,704 of
    region_tokens.feature_proj.weight by 5.4e-5 under ZeRO-2 accumulation, the next by 1.1e-5). A rank averaging
    gradients wrongly moves every element instead."""
    outside = (got - expected).abs() > atol + rtol * expected.abs()
    if int(outside.sum()) <= max_outliers:
        torch.testing.assert_close(got, expected, rtol=0.0, atol=outlier_atol, msg=key)
        return
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=key)


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory) -> Path:
    """The plain loop, 6 steps of 2 micro-batches of 8."""
    return plain(tmp_path_factory.mktemp("plain-accumulated"), **{"deepspeed.gradient_accumulation_steps": 2})


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow),
                                   2, 3])
def test_gradient_accumulation_under_deepspeed_matches_the_plain_loop(stage, accumulated, tmp_path):
    """DeepSpeed places the accumulation boundary by its own micro-step counter, so the loop hands it every
    micro-batch's backward and step; one step() per optimizer step made it step every second call."""
    output = tmp_path / f"zero{stage}"
    run_ranks([SCRIPT, "--output", str(output), "--no-eval", "--no-progress",
               *small_overrides(6, 8, **{"deepspeed.gradient_accumulation_steps": 2,
                                         "deepspeed.zero_stage": stage})], world_size=1)
    assert (output / "checkpoints" / "step_000006" / "engine").is_dir()
    assert_same_run(output, accumulated)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The plain loop with the global batch of two ranks of 4."""
    return plain(tmp_path_factory.mktemp("one-process"), batch_size=8)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_process_with_the_same_global_batch_and_resume_exactly(stage, one_process, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    argv = ["--no-eval", "--no-progress", *small_overrides(6, 4, **{"deepspeed.zero_stage": stage})]
    run_ranks([SCRIPT, "--output", str(straight), *argv], world_size=2)
    assert_same_run(straight, one_process)
    run_ranks([SCRIPT, "--output", str(split), "--stop-after", "3", *argv], world_size=2)
    run_ranks([SCRIPT, "--output", str(split), "--resume", *argv], world_size=2)
    assert [(l["step"], l["loss"]) for l in read_log(split)] == [(l["step"], l["loss"]) for l in read_log(straight)]
    resumed = exported_weights(split)
    for key, value in exported_weights(straight).items():
        assert torch.equal(resumed[key], value), key


NAN_ON_RANK_1 = """
import os, sys
import torch

rank, calls = int(os.environ.get("RANK", 0)), {{"n": 0}}


def poisoned(loss):
    calls["n"] += 1
    return loss * float("nan") if rank == 1 and calls["n"] == {call} else loss

{patch}
"""

PATCH_PRETRAIN = """
import tasks
for name in tasks.list_tasks():
    cls = type(tasks.get_task(name, **({"class_names": ["a"]} if name == "classification" else {})))
    cls.loss = (lambda original: lambda self, model, batch: poisoned(original(self, model, batch)))(cls.loss)
from launch import pretrain
pretrain.main(sys.argv[1:])
"""

PATCH_CLASSIFY = """
from launch import classification, classify
build = classification.build_criterion
def build_criterion(args, num_classes):
    criterion, mixup = build(args, num_classes)
    return (lambda logits, targets: poisoned(criterion(logits, targets))), mixup
classification.build_criterion = build_criterion
classify.main(sys.argv[1:])
"""


def nan_script(tmp_path: Path, patch: str, call: int) -> str:
    path = tmp_path / "nan_on_rank_1.py"
    path.write_text(textwrap.dedent(NAN_ON_RANK_1.format(call=call, patch=patch)))
    return str(path)


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank_in_pretraining(stage, tmp_path):
    output = tmp_path / "nan"
    script = nan_script(tmp_path, PATCH_PRETRAIN, call=2)
    outputs = run_ranks([script, "--output", str(output), "--no-eval", "--no-progress",
                         *small_overrides(4, 4, **{"deepspeed.zero_stage": stage, "checkpoint.every_steps": 1,
                                                   "checkpoint.keep": 4})], world_size=2, timeout=900)
    assert "step 2: task" in outputs[0] and "skipped on every rank" in outputs[0]
    lines = read_log(output)
    assert [l["step"] for l in lines if l.get("skipped")] == [2]
    assert [(l["step"], l["consecutive"]) for l in read_log(output, "nonfinite")] == [(2, 1)]
    after_1, after_2, after_3 = (exported_weights(output, step) for step in (1, 2, 3))
    for key in after_1:
        assert torch.equal(after_2[key], after_1[key]), key  # the skipped step moved nothing
    assert any(not torch.equal(after_3[key], after_1[key]) for key in after_1)


def test_a_nan_on_one_rank_skips_the_step_on_every_rank_in_classification(tmp_path):
    from test_classify import tiny_args, write_image_folder

    data = write_image_folder(tmp_path / "data", train=8, val=2)
    output = tmp_path / "run"
    script = nan_script(tmp_path, PATCH_CLASSIFY, call=2)
    run_ranks([script, *tiny_args(data, output, "--deepspeed", "--zero-stage", "2", "--device", "cpu",
                                  "--batch-size", "4", "--epochs", "1", "--mixup", "0", "--cutmix", "0")],
              world_size=2, timeout=900)
    steps = read_log(output, "step")
    assert [l["step"] for l in steps] == [1, 2, 3]
    assert [l["step"] for l in steps if l.get("skipped")] == [2]
    assert [l["step"] for l in read_log(output, "nonfinite")] == [2]


def test_a_nan_in_a_plain_classification_run_is_skipped_not_fatal(tmp_path, monkeypatch):
    from launch import classification, classify
    from test_classify import tiny_args, write_image_folder

    build, calls = classification.build_criterion, {"n": 0}

    def build_criterion(args, num_classes):
        criterion, mixup = build(args, num_classes)

        def poisoned(logits, targets):
            calls["n"] += 1
            loss = criterion(logits, targets)
            return loss * float("nan") if calls["n"] == 2 else loss
        return poisoned, mixup

    monkeypatch.setattr(classification, "build_criterion", build_criterion)
    result = classify.main(tiny_args(write_image_folder(tmp_path / "data", 16, 8), tmp_path / "run", "--epochs", "1", "--mixup", "0",
                                     "--cutmix", "0"))
    assert result["step"] == 6
    assert [l["step"] for l in read_log(tmp_path / "run", "step") if l.get("skipped")] == [2]


CLIP_LOSS_RANKS = """
import os, torch, torch.distributed as dist
from tasks.retrieval import clip_loss
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
images, texts = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
scale = torch.tensor(10.0, dtype=torch.float64)
mine = slice(4 * rank, 4 * rank + 4)
local_images = images[mine].clone().requires_grad_()
local_texts = texts[mine].clone().requires_grad_()
loss = clip_loss(local_images, local_texts, scale)
loss.backward()
torch.save({"loss": loss.detach(), "images": local_images.grad, "texts": local_texts.grad},
           os.environ["OUT"] + f"/rank{rank}.pt")
# Leave together and tear the group down: a rank that exits with gloo's threads still up dies in std::terminate
# ("terminate called without an active exception"), as this script did now and then.
dist.barrier()
dist.destroy_process_group()
"""


def test_clip_loss_gathers_with_gradient_across_two_ranks(tmp_path):
    """Two ranks with half the batch each: the mean of their losses, and the gradient each gets for its own
    features times the world size (DeepSpeed averages them), are those of one process with the whole batch."""
    from tasks.retrieval import clip_loss

    script = tmp_path / "clip_ranks.py"
    script.write_text(CLIP_LOSS_RANKS)
    run_ranks([str(script)], world_size=2, env={"OUT": str(tmp_path)})
    torch.manual_seed(0)
    images = torch.randn(8, 16, dtype=torch.float64).requires_grad_()
    texts = torch.randn(8, 16, dtype=torch.float64).requires_grad_()
    whole = clip_loss(images, texts, torch.tensor(10.0, dtype=torch.float64), rank=0, world_size=1)
    whole.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole.detach())
    for name, full in (("images", images.grad), ("texts", texts.grad)):
        gathered = torch.cat([ranks[0][name], ranks[1][name]]) / 2  # the average over ranks of the same weights
        torch.testing.assert_close(gathered, full, msg=name)


NEGATIVES_RANKS = """
import os, torch, torch.distributed as dist
from tasks.retrieval import clip_loss_with_negatives
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
images, texts = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
negatives = torch.randn(8, 16, dtype=torch.float64)
scale = torch.tensor(10.0, dtype=torch.float64)
mine = slice(4 * rank, 4 * rank + 4)
their_negatives = slice(0, 3) if rank == 0 else slice(3, 8)  # unequal counts: the gather pads
local = [t[part].clone().requires_grad_() for t, part in ((images, mine), (texts, mine), (negatives, their_negatives))]
loss = clip_loss_with_negatives(*local, scale)
loss.backward()
torch.save({"loss": loss.detach(), "images": local[0].grad, "texts": local[1].grad, "negatives": local[2].grad},
           os.environ["OUT"] + f"/rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
"""


def test_hard_negatives_are_gathered_with_gradient_across_two_ranks(tmp_path):
    """Each picture is ranked against every rank's negatives (the ranks hold 3 and 5 of them): the ranks' mean
    loss and gradients are those of one process with the whole batch and all the negatives."""
    from tasks.retrieval import clip_loss_with_negatives

    script = tmp_path / "negative_ranks.py"
    script.write_text(NEGATIVES_RANKS)
    run_ranks([str(script)], world_size=2, env={"OUT": str(tmp_path)})
    torch.manual_seed(0)
    whole_inputs = [torch.randn(8, 16, dtype=torch.float64).requires_grad_() for _ in range(3)]
    whole = clip_loss_with_negatives(*whole_inputs, torch.tensor(10.0, dtype=torch.float64), rank=0, world_size=1)
    whole.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole.detach())
    for name, full in zip(("images", "texts", "negatives"), (t.grad for t in whole_inputs)):
        gathered = torch.cat([ranks[0][name], ranks[1][name]]) / 2
        torch.testing.assert_close(gathered, full, msg=name)
