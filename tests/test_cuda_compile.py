"""The CUDA kernel compiles with nvcc for Ampere (sm_80) and Hopper (sm_90). CI has nvcc but no GPU, so
this is compile-only; the numerical checks against the reference run where a GPU is present."""
import os
import shutil
import subprocess

import pytest
import torch

from ops.build import compile_cuda_object, find_cuda_home

HAS_NVCC = find_cuda_home() is not None or shutil.which("nvcc") is not None


@pytest.mark.skipif(not HAS_NVCC and os.environ.get("CI") != "true", reason="no CUDA toolkit on this machine")
def test_cuda_source_compiles_for_sm80_and_sm90(tmp_path):
    output = tmp_path / "dcnv3_cuda.o"
    try:
        command = compile_cuda_object(output, archs=("80", "90"))
    except subprocess.CalledProcessError as error:
        pytest.fail(f"nvcc failed:\n{error.stderr[-4000:]}")
    assert output.stat().st_size > 0
    assert "arch=compute_80,code=sm_80" in command and "arch=compute_90,code=sm_90" in command
    # Both architectures' machine code is in the object (the fatbinary names each ELF's architecture).
    blob = output.read_bytes()
    assert b"sm_80" in blob and b"sm_90" in blob


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 1e-2),
                                              (torch.float16, 1e-2)])
def test_cuda_kernel_matches_reference(dtype, tolerance):
    from ops import dcnv3_core, dcnv3_core_reference

    for channels in (1, 16, 30, 32, 64, 71, 1025):  # the official test's widths: every reduction path
        gen = torch.Generator().manual_seed(channels)
        x = torch.randn(3, 9, 11, 2 * channels, generator=gen, dtype=torch.float64)
        offset = torch.randn(3, 9, 11, 2 * 9 * 2, generator=gen, dtype=torch.float64) * 3
        mask = torch.rand(3, 9, 11, 2 * 9, generator=gen, dtype=torch.float64)
        scalars = (3, 3, 1, 1, 1, 1, 1, 1, 2, channels, 1.5, False)
        low = [t.to(dtype) for t in (x, offset, mask)]
        ref_leaves = [t.double().requires_grad_(True) for t in low]
        cuda_leaves = [t.cuda().requires_grad_(True) for t in low]
        ref = dcnv3_core_reference(*ref_leaves, *scalars)
        out = dcnv3_core(*cuda_leaves, *scalars, backend="cuda")
        upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype)
        ref_grads = torch.autograd.grad(ref, ref_leaves, upstream.double())
        grads = torch.autograd.grad(out, cuda_leaves, upstream.cuda())
        for name, got, expected in zip(("output", "input", "offset", "mask"), (out, *grads), (ref, *ref_grads)):
            error = ((got.double().cpu() - expected).norm() / expected.norm()).item()
            assert error < tolerance, f"D={channels} {dtype} {name}: relative error {error:.2e}"
