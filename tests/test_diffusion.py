"""The text-to-image branch: a few CPU steps lower the denoising loss; guidance at scale 1 is the conditional
prediction; the null condition never gives NaN; samples depend on prompt and seed only; the export round trip gives
the same pictures; a diffusers folder (UNet, VAE, scheduler) saved by save_pretrained loads as the branch; the EMA
follows the weights; the text_to_image suite judges, draws its grid and (with a local Inception file) adds FID."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_model import TINY_BACKBONE, offline_cache  # noqa: F401  (a fixture)

BRANCH = {"image_size": 16, "block_out_channels": [16, 32], "cross_attention_levels": [False, True],
          "cross_attention_dim": 32, "attention_head_dim": 8}
PROMPTS = ["a red circle", "two blue stars and a green square"]


def tiny_model(**diffusion):
    from uniperceiver import UniPerceiver, tiny_config
    torch.manual_seed(0)
    return UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                    diffusion={**BRANCH, **diffusion})).eval()


def pictures(count: int = 4, size: int = 16) -> torch.Tensor:
    """Flat colour squares on black, in [-1, 1]: a handful the UNet can learn in a few steps."""
    out = -torch.ones(count, 3, size, size)
    for i in range(count):
        out[i, i % 3, 4:12, 4:12] = 1.0
    return out


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


@pytest.mark.usefixtures("offline_cache")
def test_a_few_cpu_steps_lower_the_denoising_loss():
    from tasks import get_task

    model = tiny_model(condition_dropout=0.0)
    task = get_task("text_to_image", image_size=64)
    batch = {"pixels": pictures(), "prompts": ["a red square", "a green square", "a blue square", "a red square"]}

    def fixed_loss() -> float:  # the same noise and timesteps every time
        with torch.no_grad():
            states, valid = model.prompt_states(batch["prompts"])
            return model.diffusion.loss(batch["pixels"], states, valid, torch.Generator().manual_seed(0)).item()

    before = fixed_loss()
    optimizer = torch.optim.AdamW(model.diffusion.parameters(), lr=2e-3)
    model.train()
    for _ in range(30):
        loss = model(task, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.diffusion.update_ema()
    model.eval()
    assert fixed_loss() < 0.6 * before
    assert int(model.diffusion.ema_steps) == 30


@pytest.mark.usefixtures("offline_cache")
def test_the_decoder_sees_the_loss_with_gradients_stopped_unless_the_recipe_says_otherwise():
    from tasks import get_task

    task = get_task("text_to_image", image_size=64)
    batch = {"pixels": pictures(2), "prompts": PROMPTS}
    for train_condition in (False, True):
        model = tiny_model(train_condition=train_condition).train()
        task.loss(model, batch).backward()
        decoder = [p.grad for p in model.decoder.parameters() if p.grad is not None]
        assert decoder, "the decoder must get a gradient (zero when stopped), not none"
        moved = any(bool(g.abs().sum() > 0) for g in decoder)
        assert moved == train_condition
        assert any(bool(p.grad.abs().sum() > 0) for p in model.diffusion.unet.parameters() if p.grad is not None)


@pytest.mark.usefixtures("offline_cache")
def test_guidance_at_scale_one_is_the_conditional_prediction():
    """Through the doubled, padded batch of guidance, the conditional half equals the UNet on the condition alone
    (padding and masks are right), and other scales combine the halves linearly."""
    model = tiny_model()
    branch = model.diffusion
    states, valid = model.prompt_states(PROMPTS)
    condition = branch.condition(states, valid)
    null = branch.null(2, states.device)
    sample = torch.randn(2, 3, 16, 16)
    t = torch.tensor([500])
    with torch.no_grad():
        conditional = branch.predict(sample, t.expand(2), condition)
        unconditional = branch.predict(sample, t.expand(2), null)
        torch.testing.assert_close(branch.guided_prediction(sample, t, condition, null, 1.0), conditional,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(branch.guided_prediction(sample, t, condition, null, 3.0),
                                   unconditional + 3.0 * (conditional - unconditional), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(conditional, unconditional, atol=1e-4)  # the condition matters


@pytest.mark.usefixtures("offline_cache")
def test_the_null_condition_never_yields_nan():
    model = tiny_model(condition_dropout=0.0)
    branch = model.diffusion
    states, valid = model.prompt_states(PROMPTS)
    dropped = branch.condition(states, valid, drop=torch.tensor([True, True]))
    assert dropped.mask.any(dim=1).all(), "a dropped row keeps its null token unmasked"
    assert dropped.mask.sum(dim=1).tolist() == [1, 1]
    prediction = branch.predict(torch.randn(2, 3, 16, 16), torch.tensor([10, 990]), dropped)
    assert torch.isfinite(prediction).all()
    model.config.diffusion.condition_dropout = 0.999  # nearly every row dropped in training
    branch.config.condition_dropout = 0.999
    loss = branch.loss(pictures(2), states, valid)
    assert torch.isfinite(loss)
    images = model.generate_images(PROMPTS, steps=3, guidance=5.0)
    assert all(np.isfinite(np.asarray(image, dtype=np.float32)).all() for image in images)


@pytest.mark.usefixtures("offline_cache")
def test_samples_depend_on_prompt_and_seed_only():
    model = tiny_model()
    alone = as_array(model.generate_images(["a red circle"], steps=4, seed=7))
    batched = as_array(model.generate_images(["a blue star", "a red circle"], steps=4, seed=[3, 7]))
    assert np.abs(alone[0] - batched[1]).max() <= 1  # rounding to 8 bits may differ by one level
    again = as_array(model.generate_images(["a red circle"], steps=4, seed=7))
    assert np.array_equal(alone, again)
    other = as_array(model.generate_images(["a red circle"], steps=4, seed=8))
    assert not np.array_equal(alone, other)
    assert model.generate_images(PROMPTS, steps=2)[0].size == (16, 16)
    with pytest.raises(ValueError, match="3 seeds for 2 prompts"):
        model.generate_images(PROMPTS, seed=[1, 2, 3])


@pytest.mark.usefixtures("offline_cache")
def test_bf16_sampling_stays_near_float32_and_sampling_leaves_the_weights_as_they_were():
    """Sampling lays the UNet's weights out channels-last and back: the training side must find them contiguous and
    unchanged. bfloat16 autocast changes the pictures by a few levels only, and is deterministic too."""
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.diffusion.unet.named_parameters()}
    float32 = as_array(model.generate_images(PROMPTS, steps=4, seed=[1, 2]))
    assert all(p.is_contiguous() and torch.equal(p, before[name]) for name, p in model.diffusion.unet.named_parameters())
    bf16 = as_array(model.generate_images(PROMPTS, steps=4, seed=[1, 2], bf16=True))
    assert np.array_equal(bf16, as_array(model.generate_images(PROMPTS, steps=4, seed=[1, 2], bf16=True)))
    difference = np.abs(bf16 - float32)
    print("bf16 vs float32: mean", difference.mean(), "max", difference.max())
    assert difference.mean() < 2.0 and difference.max() <= 16


@pytest.mark.usefixtures("offline_cache")
def test_the_export_round_trip_gives_identical_samples(tmp_path):
    from tasks import get_task
    from uniperceiver import UniPerceiver

    model = tiny_model()
    task = get_task("text_to_image", image_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):  # trained a little, so that the EMA and the weights differ
        loss = model(task, {"pixels": pictures(2), "prompts": PROMPTS})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.diffusion.update_ema()
    model.eval()
    model.save_pretrained(tmp_path / "export")
    diffusion = tmp_path / "export" / "diffusion"
    assert (diffusion / "unet" / "config.json").is_file() and (diffusion / "scheduler" / "scheduler_config.json").is_file()
    from safetensors.torch import load_file
    assert not [k for k in load_file(str(tmp_path / "export" / "model.safetensors")) if k.startswith("diffusion.unet.")]
    loaded = UniPerceiver.from_pretrained(tmp_path / "export")
    first = as_array(model.generate_images(PROMPTS, steps=5, seed=11))
    second = as_array(loaded.generate_images(PROMPTS, steps=5, seed=11))
    assert np.array_equal(first, second)


@pytest.mark.usefixtures("offline_cache")
def test_a_model_without_the_branch_still_saves_and_loads(tmp_path):
    from uniperceiver import UniPerceiver, tiny_config

    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE}))
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "diffusion").exists()
    loaded = UniPerceiver.from_pretrained(tmp_path / "plain")
    assert not loaded.has_diffusion
    with pytest.raises(ValueError, match="no diffusion branch"):
        loaded.generate_images(["a red circle"])


@pytest.mark.usefixtures("offline_cache")
def test_a_diffusers_folder_with_unet_vae_and_scheduler_loads_as_the_branch(tmp_path):
    """A tiny randomly initialised Stable-Diffusion-like folder (UNet with cross_attention_dim 24, not the decoder's
    width, a VAE, a PNDM-style scheduler config) saved by diffusers: latent-space training and sampling, export."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from uniperceiver import UniPerceiver

    torch.manual_seed(0)
    root = tmp_path / "tiny-sd"
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                         cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=16).save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", prediction_type="epsilon",
                  timestep_spacing="leading", steps_offset=1).save_pretrained(root / "scheduler")
    model = tiny_model(pretrained=str(root))
    branch = model.diffusion
    assert branch.vae is not None and branch.cross_attention_dim == 24
    assert branch.projection.in_features == 64 and branch.projection.out_features == 24
    assert branch.image_size == 16 and branch.prediction_type == "epsilon"
    states, valid = model.prompt_states(PROMPTS)
    loss = branch.loss(pictures(2, 16), states, valid)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None for p in branch.vae.parameters())  # the VAE stays frozen
    images = model.generate_images(PROMPTS, steps=3, seed=1)
    assert images[0].size == (16, 16)
    model.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "diffusion" / "vae" / "config.json").is_file()
    again = UniPerceiver.from_pretrained(tmp_path / "export").generate_images(PROMPTS, steps=3, seed=1)
    assert np.array_equal(as_array(images), as_array(again))


def test_a_folder_that_is_not_a_diffusers_checkpoint_is_named_in_the_error(tmp_path):
    from uniperceiver.diffusion import DiffusionBranch, DiffusionConfig

    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"unet holds no diffusers UNet"):
        DiffusionBranch(DiffusionConfig(pretrained=str(tmp_path)), 64)
    with pytest.raises(ValueError, match="prediction_type 'x0'"):
        DiffusionConfig(prediction_type="x0")


def test_the_ema_follows_the_weights_and_sampling_uses_it():
    from uniperceiver.diffusion import DiffusionBranch, DiffusionConfig

    torch.manual_seed(0)
    branch = DiffusionBranch(DiffusionConfig(**{**BRANCH, "ema_decay": 0.9}), 64)
    parameter = next(branch.unet.parameters())
    start = parameter.detach().clone()
    for _ in range(20):
        with torch.no_grad():
            parameter.add_(1.0)
        branch.update_ema()
    shadow = branch.ema_buffers()[0]
    assert (start < shadow).all() and (shadow < parameter).all()  # behind the weights, ahead of the start
    current = parameter.detach().clone()
    with branch.averaged_weights():
        torch.testing.assert_close(next(branch.unet.parameters()), shadow)
    torch.testing.assert_close(parameter, current)  # the training weights are back


@pytest.mark.usefixtures("offline_cache")
def test_the_text_to_image_suite_judges_the_pictures_and_draws_the_grid(tmp_path):
    from data_recipes.shapes import ShapesConfig, build_shapes_dataset
    from eval.text_to_image import evaluate_text_to_image, format_results

    config = ShapesConfig(train_size=0, val_size=0, test_size=12)
    rows = build_shapes_dataset(tmp_path / "shapes", config)["test"]
    model = tiny_model(pooled_condition=True)
    from uniperceiver import UniPerceiver, tiny_config
    judge = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE},
                                     detection={"levels": [1, 2, 3], "width": 32, "depth": 1})).eval()
    results = evaluate_text_to_image(model, judge, config, rows, seeds=[0], two_object_limit=3, steps=2,
                                     grid=tmp_path / "samples.png")
    counts = results["counts"]
    assert counts["one_object_prompts"] == 30 and 1 <= counts["two_object_prompts"] <= 3
    assert counts["pictures"] == 30 + counts["two_object_prompts"]
    for name in ("colour", "shape", "count", "both", "two_objects", "retrieval_R@1"):
        assert 0.0 <= results["metrics"][f"t2i/{name}"] <= 1.0
    assert results["metrics"]["t2i/both"] <= min(results["metrics"]["t2i/colour"], results["metrics"]["t2i/shape"])
    from PIL import Image
    grid = Image.open(tmp_path / "samples.png")
    assert grid.height >= 64 * 30 and "| t2i/colour |" in format_results(results)


def test_the_judge_reads_colour_and_shape_the_way_the_prompt_states_them():
    """judge_pictures with a stand-in judge whose answers are fixed: the checks compare with the prompt."""
    from types import SimpleNamespace

    from data_recipes.shapes import ShapesConfig
    from eval.text_to_image import judge_pictures
    from PIL import Image
    from uniperceiver.detection import Detections

    class Judge(torch.nn.Module):
        config = SimpleNamespace(image=SimpleNamespace(image_size=32))

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def classify(self, pixels, names):  # red for every picture and crop
            return torch.eye(len(names))[[0] * pixels.shape[0]]

        def detect(self, pixels, names, score_threshold):  # one circle, then nothing
            boxes = torch.tensor([[2.0, 2.0, 20.0, 20.0]])
            return [Detections(boxes, torch.tensor([0.9]), torch.tensor([0])),
                    Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))]

    pictures = [Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16))]
    verdicts = judge_pictures(Judge(), pictures, [[("red", "circle")], [("blue", "circle")]], ShapesConfig())
    assert verdicts[0] == {**verdicts[0], "colour_right": True, "shape_right": True, "both_right": True,
                           "count_right": True, "all_found": True}
    assert verdicts[1]["colour_right"] is False and verdicts[1]["shape_right"] is False
    assert verdicts[1]["count_right"] is False


def test_fid_and_kid_come_from_a_local_inception_file(tmp_path, monkeypatch):
    """torch-fidelity with a randomly initialised Inception file written here: the metrics are computed offline
    (the real weights cannot be downloaded) and a missing file is named."""
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as inception
    from PIL import Image

    from eval.text_to_image import fidelity_metrics

    with monkeypatch.context() as patch:  # build the network without its download, to save random weights
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(network.state_dict(), weights)
    rng = np.random.default_rng(0)
    real = tmp_path / "real"
    real.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(real / f"{i}.png")
    generated = [Image.fromarray(rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)) for _ in range(12)]
    metrics = fidelity_metrics(generated, real, weights, kid_subset_size=6)
    assert set(metrics) == {"FID", "KID"} and all(np.isfinite(v) for v in metrics.values())
    assert metrics["FID"] > 0
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        fidelity_metrics(generated, real, tmp_path / "missing.pth")


@pytest.mark.usefixtures("offline_cache")
def test_the_sampling_benchmark_prints_a_table_and_writes_json(tmp_path, capsys):
    import json

    from eval import sampling_bench

    model = tiny_model()
    model.save_pretrained(tmp_path / "export")
    result = sampling_bench.main(["--model", str(tmp_path / "export"), "--pictures", "2", "--steps", "2",
                                  "--sizes", "32", "--repeats", "1", "--out", str(tmp_path / "sampling.json")])
    assert len(result["cases"]) == 2 and all(case["seconds"] > 0 and case["bf16_seconds"] > 0
                                             for case in result["cases"].values())
    assert json.loads((tmp_path / "sampling.json").read_text())["steps"] == 2
    assert "| 32 px (same UNet) |" in capsys.readouterr().out


def test_one_blob_detected_under_two_names_counts_as_one_object():
    from eval.text_to_image import distinct_objects
    from uniperceiver.detection import Detections

    found = Detections(torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 10, 10], [20.0, 20, 30, 30]]),
                       torch.tensor([0.9, 0.8, 0.5]), torch.tensor([2, 0, 1]))
    kept = distinct_objects(found)
    assert kept.labels.tolist() == [2, 1] and kept.scores.tolist() == pytest.approx([0.9, 0.5])


def test_object_weight_maps_weigh_the_pixels_inside_the_boxes():
    """Boxes in each picture's own pixels (PIL width x height, tensor (3, H, W)), scaled to the map; a pixel is
    inside when its centre is."""
    from PIL import Image

    from tasks.text_to_image import object_weight_maps

    samples = [{"image": Image.new("RGB", (64, 64)), "boxes": [[16, 8, 16, 32]]},
               {"image": Image.new("RGB", (64, 32)), "boxes": [[0, 0, 8, 8]]},      # wide: x halves, y keeps
               {"image": torch.zeros(3, 16, 64), "boxes": [[32, 4, 32, 4]]},         # wide tensor: x halves, y doubles
               {"image": Image.new("RGB", (64, 64)), "boxes": [[1, 1, 2, 2]]},       # x and y in [1, 3) px
               {"image": Image.new("RGB", (64, 64)), "boxes": []}]
    maps = object_weight_maps(samples, 32, 5.0, "text_to_image")
    assert maps.shape == (5, 1, 32, 32)
    expected = torch.ones(5, 32, 32)
    expected[0, 4:20, 8:16] = 5.0
    expected[1, 0:8, 0:4] = 5.0
    expected[2, 8:16, 16:32] = 5.0
    expected[3, 0, 0] = 5.0  # centre at 1 px: in; the next, at 3 px, is on the far edge: out
    torch.testing.assert_close(maps[:, 0], expected)
    full = torch.ones(64, 64)
    full[1:3, 1:3] = 5.0     # at the picture's own size, the centres 1.5 and 2.5 px; 0.5 and 3.5 are out
    torch.testing.assert_close(object_weight_maps(samples[3:4], 64, 5.0, "text_to_image")[0, 0], full)
    with pytest.raises(ValueError, match=r"sample 0 has box \[1, 2\]; expected COCO"):
        object_weight_maps([{"image": Image.new("RGB", (8, 8)), "boxes": [[1, 2]]}], 8, 2.0, "text_to_image")


@pytest.mark.usefixtures("offline_cache")
def test_the_task_weighs_the_objects_when_asked_and_names_what_is_missing():
    from PIL import Image

    from tasks import get_task

    image = Image.new("RGB", (64, 64))
    plain = get_task("text_to_image", image_size=64).format_batch([{"image": image, "caption": "a red circle"}])
    assert "pixel_weights" not in plain
    task = get_task("text_to_image", image_size=64, object_weight=3.0)
    batch = task.format_batch([{"image": image, "caption": "a red circle", "boxes": [[0, 0, 32, 16]]}])
    expected = torch.ones(1, 1, 64, 64)
    expected[..., :16, :32] = 3.0
    torch.testing.assert_close(batch["pixel_weights"], expected)
    with pytest.raises(KeyError, match="boxes"):
        task.format_batch([{"image": image, "caption": "a red circle"}])
    for bad in (0.0, -1.0, float("nan"), float("inf"), "5"):
        with pytest.raises(ValueError, match="object_weight .*; expected a finite number > 0"):
            get_task("text_to_image", image_size=64, object_weight=bad)


@pytest.mark.usefixtures("offline_cache")
def test_pixel_weights_give_the_weighted_mean_of_the_squared_error():
    """Against the loss written out: the same draws, the UNet's velocity error, its weighted mean per picture,
    Min-SNR weighted; a constant map is the unweighted loss."""
    from diffusers.training_utils import compute_snr

    model = tiny_model(condition_dropout=0.0)
    branch = model.diffusion
    states, valid = model.prompt_states(["a red square", "a green square"])
    clean, seeds = pictures(2), [3, 4]
    weights = torch.ones(2, 1, 32, 32)
    weights[0, :, 7:23, 9:24] = 5.0  # edges inside the UNet's 2x2 cells: the area mean of the map, not a sample
    with torch.no_grad():
        plain = branch.loss(clean, states, valid, seeds=seeds)
        torch.testing.assert_close(branch.loss(clean, states, valid, seeds=seeds,
                                               pixel_weights=torch.full((2, 1, 32, 32), 7.0)), plain)
        weighted = branch.loss(clean, states, valid, seeds=seeds, pixel_weights=weights)
        noise, timesteps, _ = branch.training_draws(clean.shape, seeds, None)
        noisy = branch.scheduler.add_noise(clean, noise, timesteps)
        error = (branch.predict(noisy, timesteps, branch.condition(states, valid))
                 - branch.scheduler.get_velocity(clean, noise, timesteps)).pow(2).mean(dim=1)  # (2, 16, 16)
        small = torch.nn.functional.avg_pool2d(weights, 2)[:, 0]  # the 32-px map at the UNet's 16 px
        per_picture = (error * small).sum(dim=(1, 2)) / small.sum(dim=(1, 2))
        snr = compute_snr(branch.scheduler, timesteps)
        expected = (per_picture * snr.clamp(max=branch.config.snr_gamma) / (snr + 1)).mean()
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(weighted, plain)
    for bad in (torch.ones(2, 3, 32, 32), torch.ones(1, 1, 32, 32), torch.ones(2, 32, 32)):
        with pytest.raises(ValueError, match=r"pixel_weights has shape .*; expected \(2, 1, height, width\)"):
            branch.loss(clean, states, valid, seeds=seeds, pixel_weights=bad)


@pytest.mark.usefixtures("offline_cache")
def test_logit_normal_timesteps_favour_the_middle_and_uniform_ones_are_unchanged():
    from uniperceiver.diffusion import DiffusionConfig

    uniform = tiny_model().diffusion
    _, drawn, _ = uniform.training_draws(torch.Size([3, 3, 16, 16]), [5, 6, 7], None)
    pinned = []
    for seed in (5, 6, 7):  # per sample: its noise, then its timestep, from its own seed
        own = torch.Generator().manual_seed(seed)
        torch.randn(3, 16, 16, generator=own)
        pinned.append(int(torch.randint(0, 1000, (1,), generator=own)[0]))
    assert drawn.tolist() == pinned  # a recipe on uniform timesteps trains on the draws it always did
    middle = tiny_model(timestep_sampling="logit_normal").diffusion
    whole = middle.training_draws(torch.Size([3, 3, 16, 16]), [5, 6, 7], None)
    parts = [middle.training_draws(torch.Size([n, 3, 16, 16]), seeds, None) for n, seeds in ((1, [5]), (2, [6, 7]))]
    for k in range(3):  # a sample draws the same however the batch is split over ranks
        torch.testing.assert_close(whole[k], torch.cat([parts[0][k], parts[1][k]]))
    own = torch.Generator().manual_seed(6)
    torch.randn(3, 16, 16, generator=own)
    assert int(whole[1][1]) == int(torch.sigmoid(torch.randn(1, generator=own))[0] * 1000)
    _, drawn, _ = middle.training_draws(torch.Size([4000, 1, 1, 1]), None, torch.Generator().manual_seed(0))
    assert 0 <= int(drawn.min()) and int(drawn.max()) <= 999
    assert 0.68 < float(((drawn >= 250) & (drawn < 750)).float().mean()) < 0.78  # sigmoid(N(0,1)): 0.73; uniform 0.5
    with pytest.raises(ValueError, match="timestep_sampling 'cosine'"):
        DiffusionConfig(timestep_sampling="cosine")
