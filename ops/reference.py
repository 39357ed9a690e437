"""Pure-PyTorch DCNv3 core: the readable ground truth every kernel is tested against.

It samples with ``F.grid_sample`` (bilinear, zero padding, align_corners=False) on the unpadded input,
which is the same as the official fallback's sampling of the zero-padded input, but it builds the
sampling grid in the input's own dtype so that float64 comparisons are exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kernel_point_grid(kernel_h: int, kernel_w: int, dilation_h: int, dilation_w: int, remove_center: bool,
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The fixed kernel offsets (x, y) relative to the kernel centre, x-major, shape (P, 2)."""
    center_w, center_h = dilation_w * (kernel_w - 1) // 2, dilation_h * (kernel_h - 1) // 2
    points = []
    for i in range(kernel_w):  # x-major: the kernel's column index is the outer loop
        for j in range(kernel_h):
            if remove_center and i == kernel_w // 2 and j == kernel_h // 2:
                continue
            points.append((i * dilation_w - center_w, j * dilation_h - center_h))
    return torch.tensor(points, dtype=dtype, device=device)


def dcnv3_core_reference(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                         dilation_h, dilation_w, group, group_channels, offset_scale, remove_center=False):
    """DCNv3 core on NHWC tensors; differentiable in all three tensor arguments."""
    n, height, width, _ = input.shape
    _, out_h, out_w, _ = offset.shape
    dtype, device = input.dtype, input.device
    points = kernel_point_grid(kernel_h, kernel_w, dilation_h, dilation_w, remove_center, dtype, device)
    num_points = points.shape[0]

    # Location of each kernel centre in unpadded pixel coordinates, (x, y) per output pixel.
    center_w, center_h = dilation_w * (kernel_w - 1) // 2, dilation_h * (kernel_h - 1) // 2
    xs = torch.arange(out_w, dtype=dtype, device=device) * stride_w - pad_w + center_w
    ys = torch.arange(out_h, dtype=dtype, device=device) * stride_h - pad_h + center_h
    centers = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (Ho, Wo, 2)

    learned = offset.reshape(n, out_h, out_w, group, num_points, 2)
    locations = centers[None, :, :, None, None, :] + (points + learned) * offset_scale  # (N,Ho,Wo,G,P,2)

    # grid_sample's normalised coordinates for align_corners=False: pixel k sits at (2k + 1)/size - 1.
    size = torch.tensor([width, height], dtype=dtype, device=device)
    grid = (2 * locations + 1) / size - 1
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, out_h * out_w, num_points, 2)

    values = input.reshape(n, height, width, group, group_channels).permute(0, 3, 4, 1, 2)
    values = values.reshape(n * group, group_channels, height, width)
    sampled = F.grid_sample(values, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # sampled: (N*G, D, Ho*Wo, P)

    weights = mask.reshape(n, out_h * out_w, group, num_points).permute(0, 2, 1, 3)
    weights = weights.reshape(n * group, 1, out_h * out_w, num_points)
    out = (sampled * weights).sum(-1)  # (N*G, D, Ho*Wo)
    out = out.reshape(n, group, group_channels, out_h, out_w).permute(0, 3, 4, 1, 2)
    return out.reshape(n, out_h, out_w, group * group_channels)
