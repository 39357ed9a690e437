"""The DCNv3 operator: the CPU kernel against the pure-PyTorch reference, gradients, dispatch and errors."""
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import ops
from ops import dcnv3 as dcnv3_module
from ops import dcnv3_core, dcnv3_core_reference
from ops.build import KernelUnavailable


def make_case(n=2, height=7, width=9, group=2, channels=5, kernel=3, stride=1, pad=1, dilation=1, scale=1.0,
              remove_center=False, offset_range=2.0, dtype=torch.float64, seed=0):
    """Random input/offset/mask for one configuration, plus the scalar arguments of dcnv3_core."""
    gen = torch.Generator().manual_seed(seed)
    out_h = (height + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    out_w = (width + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    points = kernel * kernel - int(remove_center)
    x = torch.randn(n, height, width, group * channels, generator=gen, dtype=torch.float64)
    offset = (torch.rand(n, out_h, out_w, group * points * 2, generator=gen, dtype=torch.float64) * 2 - 1) * offset_range
    mask = torch.rand(n, out_h, out_w, group * points, generator=gen, dtype=torch.float64)
    scalars = (kernel, kernel, stride, stride, pad, pad, dilation, dilation, group, channels, scale, remove_center)
    return [t.to(dtype) for t in (x, offset, mask)], scalars


def forward_and_grads(fn, tensors, scalars, grad_seed=1):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, *scalars)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def cpu_kernel(*args):
    return dcnv3_core(*args, backend="cpu")


def _random_configs(count=24, seed=1234):
    """Random configurations covering the required axes; fixed seed so failures reproduce."""
    rng = random.Random(seed)
    configs = []
    for index in range(count):
        kernel = rng.choice([3, 5])
        dilation = rng.choice([1, 2])
        configs.append(dict(
            n=rng.choice([1, 2, 3, 5]),
            # at least the dilated kernel's extent, so that even pad 0 leaves an output pixel
            height=rng.randint(dilation * (kernel - 1) + 1, 12), width=rng.randint(dilation * (kernel - 1) + 1, 12),
            group=rng.choice([1, 2, 3, 4]), channels=rng.choice([1, 3, 5, 7, 8, 16, 24]),
            kernel=kernel, stride=rng.choice([1, 2]), pad=rng.choice([0, 1, 2]), dilation=dilation,
            scale=rng.choice([0.5, 1.0, 1.5, 2.0]), remove_center=rng.random() < 0.3,
            offset_range=rng.choice([1.0, 3.0, 20.0]),  # 20: many points land far outside the image
            seed=index))
    return configs


RANDOM_CONFIGS = _random_configs()


@pytest.mark.parametrize("config", RANDOM_CONFIGS, ids=lambda c: "k{kernel}s{stride}p{pad}d{dilation}g{group}c{channels}n{n}"
                         "o{scale}rc{remove_center:d}r{offset_range:g}".format(**c))
def test_cpu_matches_reference_float64(config):
    tensors, scalars = make_case(**config)
    out_ref, grads_ref = forward_and_grads(dcnv3_core_reference, tensors, scalars)
    out_cpu, grads_cpu = forward_and_grads(cpu_kernel, tensors, scalars)
    torch.testing.assert_close(out_cpu, out_ref, rtol=1e-10, atol=1e-10)
    for name, got, expected in zip(("input", "offset", "mask"), grads_cpu, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad_{name}: {m}")


@pytest.mark.parametrize("config", RANDOM_CONFIGS[:6], ids=str)
def test_cpu_matches_reference_float32(config):
    tensors, scalars = make_case(**config, dtype=torch.float32)
    out_ref, grads_ref = forward_and_grads(dcnv3_core_reference, tensors, scalars)
    out_cpu, grads_cpu = forward_and_grads(cpu_kernel, tensors, scalars)
    assert out_cpu.dtype == torch.float32
    torch.testing.assert_close(out_cpu, out_ref, rtol=1e-4, atol=1e-4)
    for got, expected in zip(grads_cpu, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_reduced_precision_accumulates_in_float32(dtype):
    (x, offset, mask), scalars = make_case(n=2, height=10, width=10, group=4, channels=16, dtype=torch.float64)
    # Keep every sampling location (offset_scale 1, integer grid) at least 0.1 px from a pixel centre: at a
    # centre the location gradient jumps, and the rounding of the two sides could pick different sides.
    offset = offset.floor() + 0.1 + 0.8 * (offset - offset.floor())
    low = [t.to(dtype) for t in (x, offset, mask)]
    upstream = torch.randn(x.shape[:3] + (x.shape[3],), generator=torch.Generator().manual_seed(1)).to(dtype)

    def run(fn, tensors, grad):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out = fn(*leaves, *scalars)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))

    # The reference in float64 on the same rounded values isolates the kernel's own arithmetic error.
    expected = run(dcnv3_core_reference, [t.double() for t in low], upstream.double())
    got = run(cpu_kernel, low, upstream)
    for name, g, e in zip(("output", "grad_input", "grad_offset", "grad_mask"), got, expected):
        assert g.dtype == dtype, name
        relative_error = ((g.double() - e).norm() / e.norm()).item()
        assert relative_error < 1e-2, f"{name}: relative error {relative_error:.2e}"


def test_gradcheck_cpu_kernel_float64():
    tensors, scalars = make_case(n=2, height=5, width=6, group=2, channels=3, kernel=3, stride=2, pad=1, dilation=1,
                                 scale=1.5, offset_range=2.0)
    leaves = [t.requires_grad_(True) for t in tensors]
    assert torch.autograd.gradcheck(lambda x, o, m: cpu_kernel(x, o, m, *scalars), leaves, eps=1e-6, atol=1e-6)
    tensors, scalars = make_case(n=1, height=6, width=5, group=3, channels=2, kernel=3, pad=1, dilation=2,
                                 remove_center=True, scale=0.5, offset_range=4.0, seed=3)
    leaves = [t.requires_grad_(True) for t in tensors]
    assert torch.autograd.gradcheck(lambda x, o, m: cpu_kernel(x, o, m, *scalars), leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_offsets_and_unit_mask_equal_a_box_filter(backend):
    """With zero offsets and mask 1, DCNv3 is a 3x3 box filter on each channel: an independent check of the
    sampling grid, the padding and the (x, y) layout that does not use the reference."""
    n, h, w, group, channels = 2, 6, 7, 2, 3
    x = torch.randn(n, h, w, group * channels, dtype=torch.float64)
    offset = torch.zeros(n, h, w, group * 9 * 2, dtype=torch.float64)
    mask = torch.ones(n, h, w, group * 9, dtype=torch.float64)
    out = dcnv3_core(x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, group, channels, 1.0, backend=backend)
    box = torch.ones(group * channels, 1, 3, 3, dtype=torch.float64)
    expected = F.conv2d(x.permute(0, 3, 1, 2), box, padding=1, groups=group * channels).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_point_order_is_x_major_and_offsets_are_x_then_y(backend):
    """One point with weight 1 and offset (dx, dy) = (1, 0) from the point (i=0, j=2) must read pixel
    (h + 1, w - 1 + 1): p = i * kernel_h + j = 2, and x moves along the width."""
    x = torch.arange(5 * 5, dtype=torch.float64).reshape(1, 5, 5, 1)
    offset = torch.zeros(1, 5, 5, 18, dtype=torch.float64)
    mask = torch.zeros(1, 5, 5, 9, dtype=torch.float64)
    mask[..., 2] = 1
    offset[..., 2 * 2] = 1.0  # dx of point 2
    out = dcnv3_core(x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1.0, backend=backend)
    assert out[0, 2, 2, 0].item() == x[0, 3, 2, 0].item()  # row h+1, column w-1+1
    assert out[0, 4, 2, 0].item() == 0.0  # row 5 is outside the image


def test_non_contiguous_inputs():
    tensors, scalars = make_case(n=3, height=8, width=6, group=2, channels=4, offset_range=3.0)
    # Views with the same values but other strides: transposed storage and a channel slice.
    x = tensors[0].transpose(1, 2).contiguous().transpose(1, 2)
    offset = torch.cat([tensors[1], torch.zeros_like(tensors[1])], dim=-1)[..., : tensors[1].shape[-1]]
    mask = tensors[2].permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    assert not (x.is_contiguous() or offset.is_contiguous() or mask.is_contiguous())
    out_ref, grads_ref = forward_and_grads(dcnv3_core_reference, tensors, scalars)
    out_cpu = cpu_kernel(x, offset, mask, *scalars)
    torch.testing.assert_close(out_cpu, out_ref)
    leaves = [t.requires_grad_(True) for t in (x.detach(), offset.detach(), mask.detach())]
    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upstream = upstream.transpose(1, 2).contiguous().transpose(1, 2)  # a non-contiguous gradient too
    grads = torch.autograd.grad(cpu_kernel(*leaves, *scalars), leaves, upstream)
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected)


def test_torch_compile_traces_the_kernel_without_graph_breaks():
    tensors, scalars = make_case(n=2, height=6, width=6, group=2, channels=4, dtype=torch.float32)
    compiled = torch.compile(lambda x, o, m: cpu_kernel(x, o, m, *scalars).sum(), backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    compiled(*leaves).backward()
    leaves_ref = [t.clone().requires_grad_(True) for t in tensors]
    dcnv3_core_reference(*leaves_ref, *scalars).sum().backward()
    for got, ref in zip(leaves, leaves_ref):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-4, atol=1e-4)


# --- errors --------------------------------------------------------------------------------------------

def _valid():
    tensors, scalars = make_case(n=2, height=6, width=6, group=2, channels=4)
    return tensors, scalars


@pytest.mark.parametrize("mutate, pattern", [
    (lambda t: (t[0][0], t[1], t[2]), r"input must be 4-D .* got shape \(6, 6, 8\)"),
    (lambda t: (t[0][..., :7], t[1], t[2]), r"input has 7 channels .* expected group \* group_channels = 2 \* 4 = 8"),
    (lambda t: (t[0], t[1][..., :-2], t[2]), r"offset has shape \(2, 6, 6, 34\), expected \(2, 6, 6, 36\)"),
    (lambda t: (t[0], t[1], t[2][:, :5]), r"mask has shape \(2, 5, 6, 18\), expected \(2, 6, 6, 18\)"),
    (lambda t: (t[0], t[1].float(), t[2]), r"offset has dtype torch.float32 but input has torch.float64"),
    (lambda t: (t[0], t[1], t[2].to("meta")), r"mask is on meta but input is on cpu"),
    (lambda t: (t[0].long(), t[1], t[2]), r"input must be a floating-point tensor"),
])
def test_bad_input_raises_value_error_naming_the_argument(mutate, pattern):
    tensors, scalars = _valid()
    with pytest.raises(ValueError, match=pattern):
        dcnv3_core(*mutate(tensors), *scalars)


def test_bad_scalars_and_backends():
    (x, offset, mask), scalars = _valid()
    with pytest.raises(ValueError, match="stride_h must be a positive integer, got 0"):
        dcnv3_core(x, offset, mask, 3, 3, 0, 1, 1, 1, 1, 1, 2, 4, 1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        dcnv3_core(x, offset, mask, *scalars, backend="triton")
    with pytest.raises(ValueError, match="backend 'cuda' needs cuda tensors, got tensors on cpu"):
        dcnv3_core(x, offset, mask, *scalars, backend="cuda")


def test_environment_variable_forces_the_backend(monkeypatch):
    (x, offset, mask), scalars = _valid()
    monkeypatch.setenv(ops.BACKEND_ENV, "reference")
    assert ops.resolve_backend("auto", x.device, x.dtype) == "reference"
    assert ops.resolve_backend("cpu", x.device, x.dtype) == "cpu"  # an explicit argument still wins
    monkeypatch.setenv(ops.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="DCNV3_BACKEND must be one of"):
        dcnv3_core(x, offset, mask, *scalars)


def test_auto_falls_back_to_the_reference_with_one_warning_when_the_kernel_cannot_be_built(monkeypatch):
    def unavailable(kind):
        raise KernelUnavailable("no C++ compiler found")

    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    monkeypatch.setattr(dcnv3_module, "load_kernel", unavailable)
    monkeypatch.setattr(dcnv3_module, "_warned", set())
    (x, offset, mask), scalars = _valid()
    with pytest.warns(RuntimeWarning, match="cpu kernel is unavailable.*no C\\+\\+ compiler found"):
        out = dcnv3_core(x, offset, mask, *scalars)
    torch.testing.assert_close(out, dcnv3_core_reference(x, offset, mask, *scalars))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dcnv3_core(x, offset, mask, *scalars)  # the second call is silent
    with pytest.raises(KernelUnavailable, match="no C\\+\\+ compiler found"):
        dcnv3_core(x, offset, mask, *scalars, backend="cpu")


@pytest.mark.parametrize("channels, remove_center", [(8, False), (16, False), (16, True), (32, False)])
def test_cpu_float32_vectorised_backward_with_points_outside(channels, remove_center):
    # float32 with 8, 16 or 32 channels per group takes the kernel's vectorised paths; offsets up to 20 px
    # send many points partly or wholly outside the image.
    (x, offset, mask), scalars = make_case(n=2, height=9, width=8, group=3, channels=channels, kernel=3, pad=1,
                                           remove_center=remove_center, offset_range=20.0, dtype=torch.float64)
    low = [t.float() for t in (x, offset, mask)]
    out_ref, grads_ref = forward_and_grads(dcnv3_core_reference, [t.double() for t in low], scalars)
    out_cpu, grads_cpu = forward_and_grads(cpu_kernel, low, scalars)
    torch.testing.assert_close(out_cpu.double(), out_ref, rtol=1e-5, atol=1e-5)
    for name, got, expected in zip(("input", "offset", "mask"), grads_cpu, grads_ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad_{name}: {m}")


def test_cpu_backward_of_an_image_too_large_for_the_compact_buffers():
    # One (n, g) slice of 600*600 pixels * 8 channels in float64 is 23 MB, above the 16 MiB the backward copies
    # into per-thread buffers: the kernel then works on the tensors in place.
    tensors, scalars = make_case(n=1, height=600, width=600, group=1, channels=8, offset_range=3.0)
    out_ref, grads_ref = forward_and_grads(dcnv3_core_reference, tensors, scalars)
    out_cpu, grads_cpu = forward_and_grads(cpu_kernel, tensors, scalars)
    for name, got, expected in zip(("input", "offset", "mask"), grads_cpu, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad_{name}: {m}")
