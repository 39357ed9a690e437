"""`dcnv3_core`: one entry point for the DCNv3 operator, dispatching to the reference, CPU or CUDA kernel.

The compiled kernels run through a plain autograd.Function in eager mode (a custom op's Python autograd
layer costs about 200 us a call, a tenth of a small stage's time) and through a torch custom op
(`dcnv3::core`, with a registered backward and a shape-only implementation) under torch.compile, which can
trace the op but not the Function's call into the extension.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from .build import KernelUnavailable, load_kernel
from .reference import dcnv3_core_reference

BACKENDS = ("auto", "reference", "cpu", "cuda")
BACKEND_ENV = "DCNV3_BACKEND"
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}
_warned: set[str] = set()


@dataclass(frozen=True)
class Geometry:
    """The output size and point count implied by a kernel configuration."""
    out_h: int
    out_w: int
    points: int


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def validate(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
             group, group_channels, remove_center) -> Geometry:
    """Checks every argument of `dcnv3_core`; raises ValueError naming the argument, what it got and what
    was expected."""
    for name, tensor in (("input", input), ("offset", offset), ("mask", mask)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"dcnv3_core: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"dcnv3_core: {name} must be 4-D channels-last (N, H, W, C), got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"dcnv3_core: {name} must be a floating-point tensor, got {tensor.dtype}")
    for name, tensor in (("offset", offset), ("mask", mask)):
        if tensor.device != input.device:
            raise ValueError(f"dcnv3_core: {name} is on {tensor.device} but input is on {input.device}")
        if tensor.dtype != input.dtype:
            raise ValueError(f"dcnv3_core: {name} has dtype {tensor.dtype} but input has {input.dtype}; cast them to one dtype")
    for name, value in (("kernel_h", kernel_h), ("kernel_w", kernel_w), ("stride_h", stride_h), ("stride_w", stride_w),
                        ("dilation_h", dilation_h), ("dilation_w", dilation_w), ("group", group),
                        ("group_channels", group_channels)):
        if int(value) != value or value < 1:
            raise ValueError(f"dcnv3_core: {name} must be a positive integer, got {value!r}")
    for name, value in (("pad_h", pad_h), ("pad_w", pad_w)):
        if int(value) != value or value < 0:
            raise ValueError(f"dcnv3_core: {name} must be a non-negative integer, got {value!r}")
    if remove_center and (kernel_h != kernel_w or kernel_h % 2 == 0):
        raise ValueError(f"dcnv3_core: remove_center needs a square odd kernel, got {kernel_h}x{kernel_w}")

    n, height, width, channels = input.shape
    if channels != group * group_channels:
        raise ValueError(f"dcnv3_core: input has {channels} channels (shape {tuple(input.shape)}), expected "
                         f"group * group_channels = {group} * {group_channels} = {group * group_channels}")
    out_h = conv_output_size(height, kernel_h, stride_h, pad_h, dilation_h)
    out_w = conv_output_size(width, kernel_w, stride_w, pad_w, dilation_w)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"dcnv3_core: input of size {height}x{width} is too small for a {kernel_h}x{kernel_w} kernel "
                         f"with padding ({pad_h}, {pad_w}) and dilation ({dilation_h}, {dilation_w})")
    points = kernel_h * kernel_w - int(bool(remove_center))
    expected_offset = (n, out_h, out_w, group * points * 2)
    expected_mask = (n, out_h, out_w, group * points)
    if tuple(offset.shape) != expected_offset:
        raise ValueError(f"dcnv3_core: offset has shape {tuple(offset.shape)}, expected {expected_offset} "
                         f"(N, Ho, Wo, group * points * 2) with points = {points}")
    if tuple(mask.shape) != expected_mask:
        raise ValueError(f"dcnv3_core: mask has shape {tuple(mask.shape)}, expected {expected_mask} "
                         f"(N, Ho, Wo, group * points) with points = {points}")
    return Geometry(out_h, out_w, points)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run: an explicit choice is honoured (or fails loudly); 'auto' follows the
    DCNV3_BACKEND variable if set, else the tensors' device, and falls back to the reference with a
    one-time warning when the kernel cannot be built."""
    if backend not in BACKENDS:
        raise ValueError(f"dcnv3_core: backend must be one of {BACKENDS}, got {backend!r}")
    explicit = backend != "auto"
    if not explicit and os.environ.get(BACKEND_ENV):
        backend = os.environ[BACKEND_ENV].strip().lower()
        if backend not in BACKENDS:
            raise ValueError(f"dcnv3_core: environment variable {BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}")
        explicit = backend != "auto"
    if backend == "auto":
        backend = device.type if device.type in KERNEL_DTYPES else "reference"
    if backend == "reference":
        return backend
    if device.type != backend:
        raise ValueError(f"dcnv3_core: backend {backend!r} needs {backend} tensors, got tensors on {device}")
    if dtype not in KERNEL_DTYPES[backend]:
        if explicit:
            raise ValueError(f"dcnv3_core: the {backend} kernel supports {KERNEL_DTYPES[backend]}, got {dtype}")
        _warn_once(f"dtype-{backend}-{dtype}", f"dcnv3_core: no {backend} kernel for {dtype}; using the reference")
        return "reference"
    try:
        load_kernel(backend)
    except KernelUnavailable as error:
        if explicit:
            raise
        _warn_once(f"build-{backend}", f"dcnv3_core: the {backend} kernel is unavailable, using the slower pure-PyTorch "
                                       f"reference instead. Reason: {error}")
        return "reference"
    return backend


def dcnv3_core(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
               group, group_channels, offset_scale, remove_center=False, backend="auto"):
    """DCNv3 core, exactly the official operator's semantics (see ops/reference.py for the math).

    input (N, H, W, G*D), offset (N, Ho, Wo, G*P*2), mask (N, Ho, Wo, G*P) -> (N, Ho, Wo, G*D).
    """
    validate(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
             group, group_channels, remove_center)
    args = (int(kernel_h), int(kernel_w), int(stride_h), int(stride_w), int(pad_h), int(pad_w), int(dilation_h),
            int(dilation_w), int(group), int(group_channels), float(offset_scale), bool(remove_center))
    chosen = resolve_backend(backend, input.device, input.dtype)
    if chosen == "reference":
        return dcnv3_core_reference(input, offset, mask, *args)
    if torch.compiler.is_compiling():
        return dcnv3_kernel(input, offset, mask, *args)
    return DCNv3KernelFunction.apply(input, offset, mask, *args)


class DCNv3KernelFunction(torch.autograd.Function):
    """Eager-mode autograd for the compiled kernels (validated arguments only: call `dcnv3_core`)."""

    @staticmethod
    def forward(ctx, input, offset, mask, *scalars):
        ctx.save_for_backward(input, offset, mask)
        ctx.scalars = scalars
        return load_kernel(input.device.type).forward(input, offset, mask, *scalars)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, offset, mask = ctx.saved_tensors
        grads = load_kernel(input.device.type).backward(input, offset, mask, grad_output.contiguous(), *ctx.scalars)
        return (*grads, *([None] * len(ctx.scalars)))


# --- the compiled kernels as a custom op --------------------------------------------------------------

@torch.library.custom_op("dcnv3::core", mutates_args=())
def dcnv3_kernel(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int,
                 stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
                 group: int, group_channels: int, offset_scale: float, remove_center: bool) -> torch.Tensor:
    """The compiled forward for the tensors' device (validated arguments only: call `dcnv3_core`)."""
    kernel = load_kernel(input.device.type)
    return kernel.forward(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                          dilation_w, group, group_channels, offset_scale, remove_center)


@dcnv3_kernel.register_fake
def _(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
      group_channels, offset_scale, remove_center):
    n, _, _, channels = input.shape
    return input.new_empty((n, offset.shape[1], offset.shape[2], channels))


@torch.library.custom_op("dcnv3::core_backward", mutates_args=())
def dcnv3_kernel_backward(grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                          kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                          dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
                          remove_center: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `dcnv3::core` with respect to input, offset and mask."""
    kernel = load_kernel(input.device.type)
    grads = kernel.backward(input, offset, mask, grad_output.contiguous(), kernel_h, kernel_w, stride_h, stride_w,
                            pad_h, pad_w, dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)
    return tuple(grads)


@dcnv3_kernel_backward.register_fake
def _(grad_output, input, offset, mask, *scalars):
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _setup_context(ctx, inputs, output):
    input, offset, mask, *scalars = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.scalars = scalars


def _backward(ctx, grad_output):
    input, offset, mask = ctx.saved_tensors
    grad_input, grad_offset, grad_mask = dcnv3_kernel_backward(grad_output, input, offset, mask, *ctx.scalars)
    return (grad_input, grad_offset, grad_mask) + (None,) * len(ctx.scalars)


dcnv3_kernel.register_autograd(_backward, setup_context=_setup_context)
