"""InternImage: the registry against the published numbers, the official key layout, the forward pass
against an independent functional statement of the release, checkpoint loading and the timm interface."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from internimage import InternImage, create_model, list_models, model_config
from internimage.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from internimage.registry import PARAM_COUNTS, STATE_DICT_ENTRIES
from internimage.transforms import build_eval_transform
from internimage_spec import internimage_t_keys, official_forward

TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), num_classes=10, drop_path_rate=0.0)
IMAGE = 64  # the smallest size at which the H/G head's two stage maps line up (stage 4 is 2x2)


def tiny_config(name: str, **overrides) -> dict:
    """A registered variant's architecture (norm placement, layer scale, head...) at toy width and depth."""
    cfg = model_config(name, **TINY, **overrides)
    if cfg.get("level2_post_norm"):
        cfg["level2_post_norm_block_ids"] = (0, 1)
    return cfg


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the initialisation zeroes offsets and mask, which would hide their wiring)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.dtype)
            if name.endswith("running_var"):
                tensor.copy_(noise.abs() + 0.5)
            elif tensor.dim() == 1 and ("norm" in name or name.endswith(("gamma1", "gamma2"))) and name.endswith(("weight", "gamma1", "gamma2")):
                tensor.copy_(1 + 0.1 * noise)
            else:
                tensor.copy_(0.2 * noise)
    return model


@pytest.mark.parametrize("name", list_models())
def test_registered_variant_matches_published_size(name):
    with torch.device("meta"):
        model = create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(count, 2) == PARAM_COUNTS[name]
    assert len(model.state_dict()) == STATE_DICT_ENTRIES[name]


def test_internimage_t_state_dict_is_the_official_layout():
    with torch.device("meta"):
        model = create_model("internimage_t")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == internimage_t_keys()


def test_larger_variants_have_the_official_extra_keys():
    with torch.device("meta"):
        s, h, g = create_model("internimage_s"), create_model("internimage_h"), create_model("internimage_g")
    s_keys, h_keys, g_keys = s.state_dict(), h.state_dict(), g.state_dict()
    assert tuple(s_keys["levels.0.blocks.0.gamma1"].shape) == (80,) and "levels.0.norm.0.weight" not in s_keys
    assert tuple(s_keys["conv_head.0.weight"].shape) == (960, 640, 1, 1)
    assert tuple(h_keys["levels.0.blocks.0.dcn.dw_conv.0.weight"].shape) == (320, 1, 5, 5)
    assert tuple(h_keys["levels.0.blocks.0.dcn.center_feature_scale_proj_weight"].shape) == (10, 320)
    assert "levels.0.blocks.0.res_post_norm1.0.weight" in h_keys and "levels.3.norm.0.weight" in h_keys
    assert [k for k in h_keys if k.startswith("levels.2.post_norms.") and k.endswith("weight")] == [
        f"levels.2.post_norms.{i}.0.weight" for i in range(5)]
    assert tuple(h_keys["dcnv3_head_x4.0.weight"].shape) == (4096, 2560, 1, 1)
    assert tuple(h_keys["dcnv3_head_x3.weight"].shape) == (1024, 1280, 1, 1)
    assert tuple(h_keys["clip_projector.cross_dcn.proj.weight"].shape) == (768, 1024)
    assert tuple(h_keys["clip_projector.cross_dcn.k_bias"].shape) == (1024,)
    assert tuple(h_keys["fc_norm.0.weight"].shape) == (768,) and "conv_head.0.weight" not in h_keys
    assert "levels.0.blocks.0.res_post_norm1.0.weight" not in g_keys and "levels.2.post_norms.7.0.weight" in g_keys
    assert tuple(g_keys["dcnv3_head_x4.0.weight"].shape) == (4096, 4096, 1, 1)


@pytest.mark.parametrize("name", list_models())
def test_forward_matches_the_official_computation(name):
    cfg = tiny_config(name, dcn_backend="reference")
    model = randomize_(InternImage(**cfg)).double().eval()
    image = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours = model(image)
        expected = official_forward(model.state_dict(), cfg, image)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    # float32 weights and input give the float64 logits to the relative error.
    with torch.no_grad():
        ours32 = model.float()(image.float()).double()
    assert ((ours32 - expected).norm() / expected.norm()).item() < 1e-4


def test_remove_center_and_uniform_drop_path_follow_the_official_math():
    cfg = tiny_config("internimage_t", dcn_backend="reference", remove_center=True)
    model = randomize_(InternImage(**cfg)).double().eval()
    image = torch.randn(1, 3, IMAGE, IMAGE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(image), official_forward(model.state_dict(), cfg, image))
    linear = InternImage(**{**TINY, "drop_path_rate": 0.3})
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for lvl in linear.levels for b in lvl.blocks]
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])
    uniform = InternImage(**{**TINY, "drop_path_rate": 0.3, "drop_path_type": "uniform"})
    assert all(b.drop_path.drop_prob == 0.3 for lvl in uniform.levels for b in lvl.blocks)


def test_cpu_kernel_backend_gives_the_reference_output():
    reference = randomize_(InternImage(**TINY, dcn_backend="reference")).eval()
    kernel = InternImage(**TINY, dcn_backend="cpu").eval()
    kernel.load_state_dict(reference.state_dict())
    pytorch_op = InternImage(**TINY, core_op="DCNv3_pytorch", dcn_backend="cpu").eval()
    pytorch_op.load_state_dict(reference.state_dict())
    assert {m.backend for m in pytorch_op.modules() if hasattr(m, "backend")} == {"reference"}
    image = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(kernel(image), reference(image), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pytorch_op(image), reference(image))


def test_features_mode_returns_four_stage_maps_after_the_stage_norm():
    model = randomize_(InternImage(**TINY, dcn_backend="reference")).eval()
    backbone = InternImage(**TINY, dcn_backend="reference", features_only=True).eval()
    report = load_checkpoint_from_model(model, backbone)
    assert "head.weight" in report.ignored and not [k for k in report.loaded if k.startswith("conv_head")]
    image = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        stages = backbone(image)
        final = model.forward_features(image)
    assert [tuple(s.shape) for s in stages] == [(1, 16 * 2 ** i, 96 // 4 // 2 ** i, 128 // 4 // 2 ** i) for i in range(4)]
    assert [info["reduction"] for info in backbone.feature_info] == [4, 8, 16, 32]
    torch.testing.assert_close(stages[-1], final)
    expected = official_forward(model.state_dict(), tiny_config("internimage_t"), image, return_stages=True)
    for ours, theirs in zip(stages, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def load_checkpoint_from_model(source: InternImage, target: InternImage):
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/weights.pth"
        torch.save({"model": source.state_dict()}, path)
        return load_checkpoint(target, path)


@pytest.mark.parametrize("wrapping", ["bare", "model", "state_dict", "module", "module_prefix", "safetensors"])
def test_load_checkpoint_reads_every_layout(tmp_path, wrapping):
    source = randomize_(InternImage(**TINY, dcn_backend="reference")).eval()
    state = source.state_dict()
    if wrapping == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        payload = {
            "bare": state, "model": {"model": state, "epoch": 300}, "state_dict": {"state_dict": state},
            "module": {"module": state}, "module_prefix": {"model": {f"module.{k}": v for k, v in state.items()}},
        }[wrapping]
        torch.save(payload, path)
    target = InternImage(**TINY, dcn_backend="reference").eval()
    report = load_checkpoint(target, path)
    assert len(report.loaded) == len(state)
    image = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(target(image), source(image), rtol=0, atol=0)


def _touch(path: str) -> str:
    """Runs when a checkpoint holding a `_RunsOnUnpickling` is fully unpickled: the test sees whether it did."""
    Path(path).touch()
    return path


class _RunsOnUnpickling:
    """A pickled object that calls a function when loaded, as a malicious checkpoint would."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


def test_a_checkpoint_holding_python_objects_is_refused_without_allow_pickle(tmp_path):
    import argparse
    source = randomize_(InternImage(**TINY))
    marker = tmp_path / "code_ran"
    path = tmp_path / "ckpt_epoch_299.pth"
    torch.save({"model": source.state_dict(), "config": argparse.Namespace(MODEL="internimage_t"),
                "hook": _RunsOnUnpickling(marker), "epoch": 299}, path)
    for load in (lambda: load_checkpoint(InternImage(**TINY), path), lambda: read_state_dict(path),
                 lambda: create_model("internimage_t", pretrained=path, **TINY)):
        with pytest.raises(CheckpointError) as error:
            load()
        message = str(error.value)
        assert str(path) in message and "holds Python objects besides tensors" in message
        assert "arbitrary code" in message and "allow_pickle=True" in message and "--allow-pickle" in message
    assert not marker.exists(), "refusing the file must not unpickle it"


def test_allow_pickle_loads_a_trusted_training_checkpoint_with_a_warning(tmp_path):
    import argparse
    source = randomize_(InternImage(**TINY))
    path = tmp_path / "ckpt_epoch_299.pth"
    torch.save({"model": source.state_dict(), "config": argparse.Namespace(MODEL="internimage_t"), "epoch": 299}, path)
    target = InternImage(**TINY)
    with pytest.warns(UserWarning, match="ckpt_epoch_299.pth holds Python objects besides tensors"):
        report = load_checkpoint(target, path, allow_pickle=True)
    assert len(report.loaded) == len(source.state_dict())
    torch.testing.assert_close(target.head.weight, source.head.weight)
    with pytest.warns(UserWarning, match="full unpickling"):
        built = create_model("internimage_t", pretrained=path, allow_pickle=True, **TINY)
    torch.testing.assert_close(built.head.weight, source.head.weight)


def test_loading_another_variant_lists_missing_unexpected_and_mismatched_keys(tmp_path):
    path = tmp_path / "internimage_s_tiny.pth"
    torch.save({"model": InternImage(**tiny_config("internimage_s")).state_dict()}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(InternImage(**{**TINY, "channels": 32}), path)
    message = str(error.value)
    assert str(path) in message
    assert "missing from the file" in message and "levels.0.norm.0.weight [32]" in message
    assert "unexpected in the file" in message and "levels.0.blocks.0.gamma1 [16]" in message
    assert "shape mismatches" in message and "patch_embed.conv1.weight: file [8, 3, 3, 3], model [16, 3, 3, 3]" in message


def test_loading_something_that_is_not_a_checkpoint_names_the_file(tmp_path):
    junk = tmp_path / "notes.pth"
    junk.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="notes.pth: not a PyTorch checkpoint"):
        load_checkpoint(InternImage(**TINY), junk)
    odd = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "lr": 0.1}, odd)
    with pytest.raises(CheckpointError, match=r"odd.pth: expected a state_dict.*'model'"):
        read_state_dict(odd)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(InternImage(**TINY), tmp_path / "missing.pth")


def test_classification_weights_into_a_layer_scale_backbone_report_missing_gammas(tmp_path):
    path = tmp_path / "t.pth"
    classifier = randomize_(InternImage(**TINY))
    torch.save({"model": classifier.state_dict()}, path)
    backbone = InternImage(**TINY, layer_scale=1.0, features_only=True)
    with pytest.warns(UserWarning, match=r"no layer-scale weights for 10 keys \(levels.0.blocks.0.gamma1"):
        report = load_checkpoint(backbone, path)
    assert len(report.kept_initialised) == 10 and all(k.endswith(("gamma1", "gamma2")) for k in report.kept_initialised)
    assert torch.equal(backbone.levels[0].blocks[0].gamma1, torch.ones(16))
    torch.testing.assert_close(backbone.levels[2].blocks[1].dcn.offset.weight,
                               classifier.levels[2].blocks[1].dcn.offset.weight)


def test_meta_device_model_gets_real_weights_from_a_checkpoint(tmp_path):
    source = randomize_(InternImage(**tiny_config("internimage_h", dcn_backend="reference"))).eval()
    path = tmp_path / "h_tiny.safetensors"
    from safetensors.torch import save_file
    save_file(source.state_dict(), str(path))
    with torch.device("meta"):
        model = create_model("internimage_h", pretrained=path, **{k: v for k, v in tiny_config("internimage_h").items()
                                                                    if k in TINY or k == "level2_post_norm_block_ids"},
                             dcn_backend="reference")
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    image = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        # Same weights; summation order may differ with the file's memory layout, so compare in float64, where
        # that rounding is far below the tolerance (in float32 it reached 1.3e-5 on this deep stack).
        torch.testing.assert_close(model.double().eval()(image), source.double()(image), rtol=1e-9, atol=1e-9)


def test_grad_checkpointing_gives_the_same_gradients():
    model = randomize_(InternImage(**TINY, dcn_backend="reference"))
    image = torch.randn(2, 3, IMAGE, IMAGE)

    def gradients():
        model.zero_grad()
        model(image).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.set_grad_checkpointing(True)
    assert all(b.with_cp for lvl in model.levels for b in lvl.blocks)
    checkpointed = gradients()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_channels_last_input_and_torch_compile_give_the_eager_output():
    model = randomize_(InternImage(**TINY, dcn_backend="cpu")).eval()
    image = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        eager = model(image)
        torch.testing.assert_close(model(image.to(memory_format=torch.channels_last)), eager, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(image), eager, rtol=1e-5, atol=1e-5)


def test_forward_head_pre_logits_and_bad_arguments():
    model = InternImage(**TINY).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, IMAGE, IMAGE))
        assert model.forward_head(features, pre_logits=True).shape == (1, int(128 * 1.5))
    with pytest.raises(ValueError, match="unknown InternImage variant 'internimage_q'"):
        create_model("internimage_q")
    with pytest.raises(ValueError, match=r"groups\[1\]=3"):
        InternImage(**{**TINY, "groups": (1, 3, 4, 8)})
    with pytest.raises(ValueError, match="core_op must be one of"):
        InternImage(**TINY, core_op="DCNv9")
    with pytest.raises(ValueError, match="dcn_backend must be one of"):
        InternImage(**TINY, dcn_backend="tpu")


def test_eval_transform_resizes_the_short_side_bicubic_and_centre_crops():
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import center_crop, normalize, resize, to_tensor
    picture = Image.fromarray((torch.rand(120, 200, 3) * 255).to(torch.uint8).numpy())
    out = build_eval_transform(64)(picture)
    assert out.shape == (3, 64, 64)
    resized = resize(picture, 64, interpolation=InterpolationMode.BICUBIC)
    assert resized.size == (106, 64)
    expected = normalize(to_tensor(center_crop(resized, 64)), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_fast_point_softmax_equals_softmax(requires_grad):
    from internimage.dcnv3 import softmax_over_points
    logits = (torch.randn(2, 5, 5, 4, 9) * 30).requires_grad_(requires_grad)
    torch.testing.assert_close(softmax_over_points(logits), logits.softmax(-1))
    if requires_grad:
        softmax_over_points(logits).pow(2).sum().backward()
        assert logits.grad is not None


def test_benchmark_script_writes_its_table(tmp_path):
    from internimage.bench import main
    out = tmp_path / "bench.json"
    result = main(["--batch", "1", "--size", "64", "--repeats", "1", "--warmup", "0", "--backends", "reference",
                   "--peers", "convnext_tiny", "--out", str(out)])
    assert out.is_file() and set(result["cpu"]) == {"internimage_t[reference]", "convnext_tiny"}
    assert all(row["images_per_s"] > 0 for row in result["cpu"].values())
