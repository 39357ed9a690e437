"""The building blocks of the training job: the unmixed task sampler, the TBGN optimizer and the recipe files."""
from __future__ import annotations

import copy
import math
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn

from launch.training.recipe import Recipe, load_recipe, resolve_recipe
from data_recipes.sampler import UnmixedTaskSampler, step_seed
from launch.training.tbgn import TBGNAdamW


# ------------------------------------------------------------------------------------------------- sampler
def test_sampler_same_seed_and_step_give_the_same_task_in_separate_instances():
    names, ratios = ["retrieval", "classification", "captioning", "vqa"], [3, 2, 3, 2]
    a, b = UnmixedTaskSampler(names, ratios, seed=7), UnmixedTaskSampler(names, ratios, seed=7)
    sequence = [a.task_at(step) for step in range(300)]
    assert [b.task_at(step) for step in range(300)] == sequence
    # resume-independence: no state, so asking from step 150 onwards (or backwards) changes nothing
    resumed = UnmixedTaskSampler(names, ratios, seed=7)
    assert [resumed.task_at(step) for step in range(299, 149, -1)] == sequence[150:][::-1]
    assert len(set(sequence)) == 4
    other_seed = [UnmixedTaskSampler(names, ratios, seed=8).task_at(step) for step in range(300)]
    assert other_seed != sequence
    assert step_seed(0, 1) != step_seed(1, 0)


def test_sampler_frequencies_follow_the_ratios():
    sampler = UnmixedTaskSampler(["a", "b", "c", "never"], [0.6, 0.3, 0.1, 0.0], seed=0)
    counts = sampler.counts(5000)
    assert sum(counts.values()) == 5000 and counts["never"] == 0
    for name, expected in (("a", 0.6), ("b", 0.3), ("c", 0.1)):
        # 4 standard deviations of a binomial proportion over 5000 draws is at most 0.028
        assert abs(counts[name] / 5000 - expected) < 0.028, counts
    assert sampler.probability("b") == pytest.approx(0.3)
    assert sampler.counts(range(100, 200)) == UnmixedTaskSampler(["a", "b", "c", "never"], [6, 3, 1, 0]).counts(
        range(100, 200))  # ratios are normalised


@pytest.mark.parametrize("names, ratios, message", [
    (["a", "b"], [1.0], "2 task names"),
    (["a", "b"], [1.0, -0.5], ">= 0"),
    (["a", "b"], [0.0, 0.0], "sum to zero"),
    (["a", "b"], [1.0, float("nan")], "finite"),
    (["a", "a"], [1.0, 1.0], "distinct"),
    ([], [], "no tasks"),
])
def test_sampler_errors(names, ratios, message):
    with pytest.raises(ValueError, match=message):
        UnmixedTaskSampler(names, ratios, seed=0)
    if names == ["a", "b"] and message == ">= 0":
        with pytest.raises(ValueError, match="step"):
            UnmixedTaskSampler(names, [1, 1]).task_at(-1)


def test_sampler_ratio_schedule_moves_each_weight_linearly_and_stays_stateless():
    names = ["early", "late", "steady"]
    sampler = UnmixedTaskSampler(names, [3.0, 0.0, 1.0], seed=3, ratios_end=[0.0, 3.0, None], steps=1001)
    assert sampler.probabilities_at(0) == pytest.approx([0.75, 0.0, 0.25])
    assert sampler.probabilities_at(500) == pytest.approx([0.375, 0.375, 0.25])  # halfway: weights 1.5, 1.5, 1
    assert sampler.probabilities_at(1000) == pytest.approx([0.0, 0.75, 0.25])
    assert sampler.probabilities_at(5000) == sampler.probabilities_at(1000)  # past the end the end ratios hold
    assert sampler.probability("late", 250) == pytest.approx(0.75 * 0.25 / 1.0)
    # no task with weight 0 at a step is drawn there; the shares follow the weights over a stretch of steps
    assert sampler.task_at(0) != "late" and sampler.task_at(1000) != "early"
    first, last = sampler.counts(range(0, 200)), sampler.counts(range(801, 1001))
    # weights over steps 0-199 average early 0.75 -> 0.6: at least 0.58 of 200 draws is 4 binomial sds below
    assert first["early"] > 0.58 * 200 > first["late"] and last["late"] > 0.58 * 200 > last["early"], (first, last)
    assert abs(sampler.counts(1001)["steady"] / 1001 - 0.25) < 0.055
    again = UnmixedTaskSampler(names, [3.0, 0.0, 1.0], seed=3, ratios_end=[0.0, 3.0, None], steps=1001)
    assert [again.task_at(step) for step in range(1000, 0, -7)] == [sampler.task_at(s) for s in range(1000, 0, -7)]
    # without end ratios (or with all of them None) the draws are those of the constant sampler, step for step
    constant = UnmixedTaskSampler(names, [3.0, 0.5, 1.0], seed=3)
    unscheduled = UnmixedTaskSampler(names, [3.0, 0.5, 1.0], seed=3, ratios_end=[None, None, None], steps=10)
    assert [constant.task_at(s) for s in range(300)] == [unscheduled.task_at(s) for s in range(300)]
    assert "early: 0.75 -> 0" in repr(sampler) and "steady: 0.25}" in repr(sampler)


@pytest.mark.parametrize("ends, steps, message", [
    ([1.0], 10, "1 end ratios"),
    ([None, -1.0], 10, "end ratios must be finite and >= 0"),
    ([0.0, 0.0], 10, "end ratios .* sum to zero"),
    ([None, 2.0], None, "steps >= 1"),
])
def test_sampler_schedule_errors(ends, steps, message):
    with pytest.raises(ValueError, match=message):
        UnmixedTaskSampler(["a", "b"], [0.0, 1.0], ratios_end=ends, steps=steps)


def test_recipe_ratio_end_reaches_the_sampler_and_is_checked():
    recipe = load_recipe("tiny", ["tasks.vqa.ratio_end=0.6", "steps=100"])
    sampler = recipe.sampler()
    assert sampler.probability("vqa", 0) == pytest.approx(recipe.sampling_ratios()["vqa"])
    ratios = {task.name: task.ratio for task in recipe.tasks}
    assert sampler.probability("vqa", 99) == pytest.approx(0.6 / (sum(ratios.values()) - ratios["vqa"] + 0.6))
    with pytest.raises(ValueError, match="tasks.vqa.ratio_end: expected a finite number >= 0"):
        load_recipe("tiny", ["tasks.vqa.ratio_end=-0.5"])
    zeros = [f"tasks.{name}.ratio_end=0" for name in ratios]
    with pytest.raises(ValueError, match=r"tasks.\*.ratio_end: expected at least one positive weight"):
        load_recipe("tiny", zeros)


# ---------------------------------------------------------------------------------------------------- TBGN
def _toy_param():
    return torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))


def test_tbgn_matches_a_hand_computed_update():
    p = _toy_param()
    opt = TBGNAdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    # Step 1, task "a": s = 0.5, ω = 2, grad (3, 4), norm 5.
    #   g = 2 (3, 4) / 5 = (1.2, 1.6)
    #   m = 0.9·0 + (0.1 / 0.5) g = (0.24, 0.32)        v = 0.999·0 + (0.001 / 0.5) g² = (0.00288, 0.00512)
    #   m̂ = m / (1 - 0.9) = (2.4, 3.2)                   v̂ = v / (1 - 0.999) = (2.88, 5.12)
    #   θ = (1, -2)·(1 - 0.1·0.1) - 0.1 · m̂ / (√v̂ + 1e-8) = (0.99, -1.98) - 0.1·√2·(1, 1)
    #   (m̂/√v̂ = (g/s) / (|g|/√s) = 1/√s = √2)
    opt.set_task("a", sampling_ratio=0.5, weight=2.0)
    p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    opt.step()
    expected = torch.tensor([0.99 - 0.1 * 2.4 / (math.sqrt(2.88) + 1e-8), -1.98 - 0.1 * 3.2 / (math.sqrt(5.12) + 1e-8)],
                            dtype=torch.float64)
    torch.testing.assert_close(p.data, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(p.data, torch.tensor([0.8485786445960238, -2.1214213556123096], dtype=torch.float64),
                               rtol=1e-14, atol=1e-14)
    assert opt.last_grad_norm == pytest.approx(5.0)
    # Step 2, task "b": s = 1, ω = 1, grad (0, 5), norm 5, g = (0, 1).
    #   m = 0.9 (0.24, 0.32) + 0.1 (0, 1) = (0.216, 0.388)      v = 0.999 (0.00288, 0.00512) + 0.001 (0, 1)
    #   bias corrections 1 - 0.9² = 0.19 and 1 - 0.999² = 0.001999
    opt.set_task("b", sampling_ratio=1.0, weight=1.0)
    p.grad = torch.tensor([0.0, 5.0], dtype=torch.float64)
    opt.step()
    m, v = (0.216, 0.388), (0.999 * 0.00288, 0.999 * 0.00512 + 0.001)
    expected = torch.tensor([theta * 0.99 - 0.1 * (mm / 0.19) / (math.sqrt(vv / 0.001999) + 1e-8)
                             for theta, mm, vv in zip(expected.tolist(), m, v)], dtype=torch.float64)
    torch.testing.assert_close(p.data, expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(p.data, torch.tensor([0.7453323118819386, -2.216966191280001], dtype=torch.float64),
                               rtol=1e-13, atol=1e-13)


def _toy_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def _loss(model, step, scale=1.0):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(16, 2, generator=generator, dtype=torch.float64)
    return scale * ((model(x) - y) ** 2).mean()


def test_tbgn_with_one_task_is_adamw_on_the_normalised_gradient():
    # betas are PyTorch's (weight of the old moment); the paper's β' = 1 - β. With s = 1 and ω = 1 the update
    # must then be AdamW's on ∇L / ‖∇L‖, step for step (including weight decay and bias correction).
    model_t, model_a = _toy_model(), _toy_model()
    tbgn = TBGNAdamW(model_t.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    adamw = torch.optim.AdamW(model_a.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05,
                              foreach=False)
    for step in range(5):
        for model in (model_t, model_a):
            model.zero_grad()
            _loss(model, step).backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model_a.parameters()]))
        for p in model_a.parameters():
            p.grad /= norm
        tbgn.set_task("only", sampling_ratio=1.0, weight=1.0)
        tbgn.step()
        adamw.step()
        for p_t, p_a in zip(model_t.parameters(), model_a.parameters()):
            torch.testing.assert_close(p_t, p_a, rtol=1e-12, atol=1e-14)


def test_tbgn_update_does_not_depend_on_the_loss_scale():
    models = [_toy_model(), _toy_model()]
    optimizers = [TBGNAdamW(m.parameters(), lr=1e-2, weight_decay=0.01) for m in models]
    for step in range(3):
        for model, opt, scale in zip(models, optimizers, (1.0, 10.0)):
            model.zero_grad()
            _loss(model, step, scale).backward()
            opt.set_task("t", sampling_ratio=0.25, weight=0.5)
            opt.step()
    assert optimizers[1].last_grad_norm == pytest.approx(10 * optimizers[0].last_grad_norm)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_tbgn_state_dict_resumes_exactly():
    schedule = [("a", 0.7, 1.0), ("b", 0.3, 2.0), ("a", 0.7, 1.0), ("b", 0.3, 2.0), ("b", 0.3, 2.0), ("a", 0.7, 1.0)]

    def run(model, opt, steps):
        for step in steps:
            model.zero_grad()
            _loss(model, step).backward()
            opt.set_task(*schedule[step])
            opt.step()

    model = _toy_model()
    opt = TBGNAdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    run(model, opt, range(3))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, range(3, 6))

    resumed = _toy_model(seed=123)
    resumed.load_state_dict(saved_model)
    resumed_opt = TBGNAdamW(resumed.parameters(), lr=1.0, weight_decay=0.0)  # hyperparameters come from the state
    resumed_opt.load_state_dict(saved_opt)
    run(resumed, resumed_opt, range(3, 6))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_tbgn_errors_and_the_deepspeed_group_guard():
    p = _toy_param()
    opt = TBGNAdamW([p], lr=0.1)
    p.grad = torch.ones(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="set_task"):
        opt.step()
    for ratio in (0.0, 1.5):
        with pytest.raises(ValueError, match="sampling_ratio"):
            opt.set_task("a", ratio, 1.0)
    with pytest.raises(ValueError, match="weight"):
        opt.set_task("a", 0.5, -1.0)
    with pytest.raises(ValueError, match="grad_norm_reduction"):
        TBGNAdamW([p], grad_norm_reduction="mean")
    with pytest.raises(ValueError, match="betas"):
        TBGNAdamW([p], betas=(0.1,))

    # DeepSpeed ZeRO 1/2 shows one group at a time: the global norm would be wrong, so step() refuses ...
    q = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    q.grad = torch.ones(3, dtype=torch.float64)
    two = TBGNAdamW([{"params": [p]}, {"params": [q], "weight_decay": 0.0}], lr=0.1)
    all_groups = two.param_groups
    two.param_groups = [all_groups[0]]
    two.set_task("a", 0.5, 1.0)
    with pytest.raises(RuntimeError, match="parameter groups"):
        two.step()
    # ... unless the caller supplies the norm
    two.set_task("a", 0.5, 1.0, grad_norm=math.sqrt(5.0))
    two.step()
    assert two.last_grad_norm == pytest.approx(math.sqrt(5.0))
    two.param_groups = all_groups

    # a zero gradient leaves the moments decaying and the weights moved by weight decay only
    zero = _toy_param()
    zopt = TBGNAdamW([zero], lr=0.1, weight_decay=0.1)
    zero.grad = torch.zeros(2, dtype=torch.float64)
    zopt.set_task("a", 1.0)
    zopt.step()
    torch.testing.assert_close(zero.data, torch.tensor([0.99, -1.98], dtype=torch.float64))


def test_tbgn_skips_a_step_with_a_non_finite_gradient_norm():
    """A NaN/inf gradient norm is the training loop's skip path: no weight, moment or step count changes (it
    used to raise FloatingPointError, which killed the run without a checkpoint)."""
    param = _toy_param()
    opt = TBGNAdamW([param], lr=0.1, weight_decay=0.1)
    param.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    opt.set_task("a", 1.0)
    opt.step()
    assert not opt.last_step_skipped
    weights = param.detach().clone()
    moments = {key: value.clone() for key, value in opt.state[param].items()}
    for bad in (float("nan"), float("inf")):
        param.grad = torch.tensor([bad, 0.0], dtype=torch.float64)
        opt.set_task("a", 1.0)
        opt.step()
        assert opt.last_step_skipped and not math.isfinite(opt.last_grad_norm)
        assert torch.equal(param.detach(), weights)
        for key, value in moments.items():
            assert torch.equal(opt.state[param][key], value), key
    param.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    opt.step()
    assert not opt.last_step_skipped and int(opt.state[param]["step"]) == 2


def test_tbgn_sum_reduction_all_reduces_the_squares(monkeypatch):
    # A fake second rank holding an identical partition: "sum" must see ‖g‖² twice, "local" once.
    reduced = []

    def all_reduce(tensor, op=None):
        reduced.append(tensor.item())
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    for reduction, expected in (("sum", math.sqrt(2) * 5.0), ("local", 5.0)):
        p = _toy_param()
        p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
        opt = TBGNAdamW([p], grad_norm_reduction=reduction)
        opt.set_task("a", 1.0)
        opt.step()
        assert opt.last_grad_norm == pytest.approx(expected)
    assert reduced == [pytest.approx(25.0)]


# -------------------------------------------------------------------------------------------------- recipe
def test_tiny_recipe_loads():
    from uniperceiver import tiny_config

    recipe = load_recipe("tiny")
    assert recipe.name == "tiny" and recipe.steps > 0
    assert recipe.task_names == ["retrieval", "classification", "captioning", "vqa", "detection", "text_to_image"]
    assert all(16 <= t.batch_size <= 32 for t in recipe.tasks)
    assert sum(recipe.sampling_ratios().values()) == pytest.approx(1.0)
    assert recipe.optimizer.name == "adamw" and recipe.optimizer.warmup_steps > 0
    assert recipe.deepspeed.zero_stage == 0
    # The tests' tiny model, with the recipe's wider backbone, finer patch tokens, deeper decoder, context regions
    # and grounded questions.
    backbone = {"channels": 24, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8], "drop_path_rate": 0.0}
    detection = {"levels": [0, 1, 2, 3], "width": 64, "depth": 2, "roi_size": 7, "num_proposals": 8,
                 "pre_nms_top_k": 100, "context_regions": 4, "context_names": True, "ground_text": True,
                 "ground_content": True, "ground_relations": True, "ground_relation_words": True,
                 "ground_counts": True}
    assert recipe.model_config() == tiny_config(image={"token_stages": [-2, -1], "backbone_overrides": backbone},
                                                decoder={"depth": 4}, detection=detection,
                                                diffusion={"image_size": 32, "block_out_channels": [32, 64, 96],
                                                           "cross_attention_levels": [False, False, True],
                                                           "timestep_sampling": "logit_normal"})
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.sampler().task_at(5) == recipe.sampler().task_at(5)
    built = recipe.build_tasks()
    assert [task.name for task in built.values()] == recipe.task_names
    assert built["retrieval"].negative_words == [["circle", "square", "triangle", "star", "diamond"]]
    assert built["text_to_image"].object_weight == 5.0
    assert built["retrieval"].negatives_per_text == 2 and built["retrieval"].negative_margin == 0.9
    assert built["classification"].class_names == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert resolve_recipe("tiny") == resolve_recipe(str(resolve_recipe("tiny")))
    with pytest.raises(FileNotFoundError, match="built-in recipes: .*'tiny'"):
        load_recipe("no-such-recipe")


def test_overrides():
    recipe = load_recipe("tiny", [
        "optimizer.lr=3e-4",                 # PyYAML reads this as a string; float fields accept it
        "tasks.captioning.ratio=0.5",        # a task by its name
        "steps=200",
        "optimizer.name=tbgn",
        "optimizer.betas=[0.9, 0.95]",       # a list
        "optimizer.grad_clip=null",
        "deepspeed.bf16=false",              # a bool
        "model.decoder.depth=3",             # a nested free-form key
        "model.max_caption_length=30",       # a model key the file leaves out
        "tasks.vqa.kwargs.label_smoothing=0.2",
        "optimizer.eps=1e-6",                # a schema key the file leaves out
        "output_dir=/tmp/run",
    ])
    assert recipe.optimizer.lr == 3e-4 and recipe.optimizer.name == "tbgn"
    assert recipe.task("captioning").ratio == 0.5 and recipe.steps == 200
    assert recipe.optimizer.betas == (0.9, 0.95) and recipe.optimizer.grad_clip is None
    assert recipe.optimizer.eps == 1e-6 and recipe.deepspeed.bf16 is False
    assert recipe.model["decoder"]["depth"] == 3 and recipe.model["decoder"]["width"] == 64
    assert recipe.model["max_caption_length"] == 30
    assert recipe.task("vqa").kwargs == {"mode": "rank", "grounding_weight": 1.0, "answer_margin": 0.5,
                                         "count_weight": 1.0, "label_smoothing": 0.2}
    assert recipe.output_dir == "/tmp/run"


def test_schedule_warms_up_then_decays_to_the_floor_and_honours_lr_scale():
    """timm's cosine schedule as the engine uses it: step s runs at update s + 1, so the first step already
    learns and the last ends at min_lr; each group's lr_scale multiplies its rate."""
    from launch.training.schedule import build_scheduler, set_learning_rate

    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "lr_scale": 1.0}, {"params": params[1:], "lr_scale": 0.1}])
    lr, warmup, total, floor = 3e-4, 10, 200, 1e-6
    scheduler = build_scheduler(optimizer, lr, total, warmup, 0.0, floor)
    assert set_learning_rate(scheduler, 0) == pytest.approx(lr / warmup)
    assert set_learning_rate(scheduler, warmup - 1) == pytest.approx(lr)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr, lr * 0.1])
    middle = set_learning_rate(scheduler, warmup - 1 + (total - warmup) // 2)
    assert middle == pytest.approx(floor + 0.5 * (lr - floor), rel=1e-3)
    assert set_learning_rate(scheduler, total - 1) == pytest.approx(floor)
    constant = build_scheduler(optimizer, lr, total, warmup, 0.0, floor, kind="constant")
    assert set_learning_rate(constant, total - 1) == pytest.approx(lr)
    with pytest.raises(ValueError, match="schedule: expected 'cosine' or 'constant'"):
        build_scheduler(optimizer, lr, total, kind="linear")


@pytest.mark.parametrize("override, message", [
    ("optimiser.lr=1", r"unknown key 'optimiser'; valid keys: \[.*'optimizer'"),
    ("optimizer.learning_rate=1", r"unknown key 'optimizer.learning_rate'; valid keys under 'optimizer': \[.*'lr'"),
    ("tasks.captioning.batchsize=8", r"unknown key 'tasks.captioning.batchsize'; valid keys under "
                                     r"'tasks.captioning': \[.*'batch_size'"),
    ("tasks.segmentation.ratio=1", r"unknown key 'tasks.segmentation': no task named 'segmentation'; tasks: "
                                   r"\['retrieval'"),
    ("steps.x=1", r"'steps' is an integer; it has no key 'x'"),
    ("steps", "expected KEY=VALUE"),
])
def test_unknown_override_keys_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("tiny", [override])


@pytest.mark.parametrize("override, message", [
    ("steps=abc", r"steps: expected an integer, got str 'abc'"),
    ("steps=1.5", r"steps: expected an integer, got float 1.5"),
    ("optimizer.lr=fast", r"optimizer.lr: expected a number, got str 'fast'"),
    ("tasks.vqa.batch_size=true", r"tasks.vqa.batch_size: expected an integer, got bool True"),
    ("deepspeed.bf16=maybe", r"deepspeed.bf16: expected 'auto' or true or false, got str 'maybe'"),
    ("optimizer.betas=[0.9]", r"optimizer.betas: expected a list of 2"),
    ("optimizer.name=sgd", r"optimizer.name: expected 'adamw' or 'tbgn'"),
    ("tasks.vqa.kwargs=3", r"tasks.vqa.kwargs: expected a mapping"),
    ("tasks.vqa.ratio=-1", r"tasks.vqa.ratio: expected a finite number >= 0"),
    ("deepspeed.zero_stage=4", r"deepspeed.zero_stage: expected 0, 1, 2 or 3"),
])
def test_bad_values_name_the_key_and_the_expected_type(override, message):
    with pytest.raises(ValueError, match=message) as error:
        load_recipe("tiny", [override])
    assert f"set by the override {override!r}" in str(error.value)


def test_errors_in_the_file_name_the_key(tmp_path):
    base = textwrap.dedent("""\
        steps: 10
        model: {}
        tasks:
          - {name: retrieval, dataset: shapes}
        """)
    good = tmp_path / "good.yaml"
    good.write_text(base)
    recipe = load_recipe(good)
    assert recipe.name == "good" and recipe.output_dir == "runs/good" and recipe.tasks[0].task == "retrieval"

    cases = {
        "optimizer:\n  lr: 1.0\n  momentum: 0.9\n": r"unknown key 'optimizer.momentum'; valid keys under 'optimizer'",
        "checkpoint: {every: 5}\n": r"unknown key 'checkpoint.every'; valid keys under 'checkpoint'",
        "epochs: 3\n": r"unknown key 'epochs'; valid keys: \['steps'",
        "eval: {every_steps: often}\n": r"eval.every_steps: expected an integer, got str 'often'",
    }
    for extra, message in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(base + extra)
        with pytest.raises(ValueError, match=message) as error:
            load_recipe(path)
        assert "bad.yaml" in str(error.value)

    bad_task = tmp_path / "bad_task.yaml"
    bad_task.write_text("steps: 10\nmodel: {}\ntasks:\n  - {name: vqa, dataset: shapes, ratio: 1, weight: 2}\n")
    with pytest.raises(ValueError, match=r"unknown key 'tasks.vqa.weight'; valid keys under 'tasks.vqa'"):
        load_recipe(bad_task)
    no_dataset = tmp_path / "no_dataset.yaml"
    no_dataset.write_text("steps: 10\nmodel: {}\ntasks:\n  - {name: vqa}\n")
    with pytest.raises(ValueError, match=r"tasks.vqa lacks the required key\(s\) \['dataset'\]"):
        load_recipe(no_dataset)
    twice = tmp_path / "twice.yaml"
    twice.write_text(base + "  - {name: retrieval, dataset: shapes}\n")
    with pytest.raises(ValueError, match="distinct task names"):
        load_recipe(twice)
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_recipe(not_a_mapping)


def test_adamw_runs_fused_and_steps_as_the_python_loop_does():
    """build_optimizer("adamw") takes torch's fused kernel for CPU float parameters; a few steps with two groups
    (one without weight decay) land where the per-tensor loop lands."""
    from launch.training.optim import build_optimizer, fused_kernel_fits
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())

    def groups(model):
        weights, biases = [model[0].weight, model[2].weight], [model[0].bias, model[2].bias]
        return [{"params": weights, "weight_decay": 0.05, "lr_scale": 1.0},
                {"params": biases, "weight_decay": 0.0, "lr_scale": 1.0}]

    fused = build_optimizer("adamw", groups(models[0]), lr=1e-2, betas=(0.9, 0.95))
    assert all(group["fused"] for group in fused.param_groups)
    loop = torch.optim.AdamW(groups(models[1]), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(5):
        for model, optimizer in zip(models, (fused, loop)):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a parameter the kernel does not take (complex) falls back to torch's default loop, and steps
    odd = nn.Parameter(torch.ones(3, dtype=torch.complex64))
    assert not fused_kernel_fits([{"params": [odd]}])
    fallback = build_optimizer("adamw", [{"params": [odd], "lr_scale": 1.0}], lr=0.1)
    assert fallback.param_groups[0]["fused"] is None
    odd.grad = torch.ones_like(odd)
    fallback.step()
    assert not torch.equal(odd.detach(), torch.ones(3, dtype=torch.complex64))
