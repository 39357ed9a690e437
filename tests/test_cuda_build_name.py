"""The CUDA kernel's build name is keyed by the architectures it is compiled for and torch's CUDA release, so
torch's extension cache (~/.cache/torch_extensions/<name>, often on a home folder shared by several
machines) never loads a build made for another GPU. Checked without a GPU: the tag is a pure function."""
from __future__ import annotations

import re

import pytest

from ops import build
from ops.build import KernelUnavailable, _cuda_arch_flags, _cuda_arch_tag


def test_the_tag_names_the_visible_gpus_and_the_cuda_release():
    assert _cuda_arch_tag([(9, 0)], None, "13.0") == "sm90_cu130"
    assert _cuda_arch_tag([(8, 0)], None, "13.0") != _cuda_arch_tag([(9, 0)], None, "13.0")
    assert _cuda_arch_tag([(9, 0)], None, "12.8") != _cuda_arch_tag([(9, 0)], None, "13.0")
    # Several GPUs: each distinct architecture once, in order, whatever the device order.
    assert _cuda_arch_tag([(9, 0), (8, 0), (9, 0)], None, "13.0") == "sm80_sm90_cu130"
    assert _cuda_arch_tag([(12, 0), (9, 0)], None, "13.0") == "sm90_sm120_cu130"
    assert _cuda_arch_tag([(9, 0)], None, "13.0") == _cuda_arch_tag([(9, 0)], None, "13.0")


def test_torch_cuda_arch_list_wins_and_is_normalised():
    expected = "sm80_sm90ptx_cu130"
    for spelling in ("8.0;9.0+PTX", "9.0+PTX;8.0", "8.0 9.0+ptx", " 8.0 ; 9.0+PTX ;", "8.0;9.0;9.0+PTX"):
        assert _cuda_arch_tag([(7, 5)], spelling, "13.0") == expected, spelling
    assert _cuda_arch_tag([], "9.0a", "13.0") == "sm90a_cu130"
    assert _cuda_arch_tag([], "Hopper", "13.0") == "sm90ptx_cu130"
    assert _cuda_arch_tag([(8, 6)], "native", "13.0") == "sm86_cu130"  # as torch: "native" means the GPUs


def test_the_tag_is_a_safe_short_name():
    long_list = "5.0;5.2;6.0;6.1;7.0;7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    for tag in (_cuda_arch_tag([], long_list, "13.0"), _cuda_arch_tag([(9, 0)], None, None),
                _cuda_arch_tag([(9, 0)], None, "13.0")):
        assert re.fullmatch(r"[a-z0-9_]+", tag) and len(tag) <= 60, tag
    assert _cuda_arch_tag([], long_list, "13.0") != _cuda_arch_tag([], long_list.replace("8.9;", ""), "13.0")
    with pytest.raises(KernelUnavailable, match=r"TORCH_CUDA_ARCH_LIST='sm_90'.*expected entries such as 8.0"):
        _cuda_arch_tag([], "sm_90", "13.0")
    with pytest.raises(KernelUnavailable, match="no CUDA architecture"):
        _cuda_arch_tag([], None, "13.0")


def _tag_of_flags(flags: list[str]) -> set[str]:
    """The architectures a list of -gencode flags compiles for, spelled as in the tag."""
    pairs = [re.fullmatch(r"arch=compute_(\w+),code=(sm|compute)_(\w+)", flag) for flag in flags[1::2]]
    assert flags[0::2] == ["-gencode"] * len(pairs) and all(pairs), flags
    machine = {m.group(3) for m in pairs if m.group(2) == "sm"}
    ptx = {m.group(3) for m in pairs if m.group(2) == "compute"}
    return {f"sm{number}{'ptx' if number in ptx else ''}" for number in machine | ptx}


@pytest.mark.parametrize("capabilities, arch_list", [([(9, 0)], None), ([(8, 0), (9, 0)], None),
                                                     ([(9, 0)], "8.0;9.0+PTX"), ([], "9.0a;10.0")])
def test_the_gencode_flags_compile_what_the_tag_says(capabilities, arch_list):
    flags = _cuda_arch_flags(capabilities, arch_list)
    tag = _cuda_arch_tag(capabilities, arch_list, "13.0")
    assert _tag_of_flags(flags) == set(tag.split("_")[:-1])


def test_the_cuda_build_is_named_and_compiled_for_the_visible_gpus(monkeypatch):
    """What _build_cuda hands to torch.utils.cpp_extension.load, with the GPU and the compiler faked."""
    import torch

    calls = []

    class FakeCppExtension:
        CUDA_HOME = None

        @staticmethod
        def load(**kwargs):
            calls.append(kwargs)
            return object()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: [(9, 0), (8, 0)][index])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(build, "find_cuda_home", lambda: "/usr/local/cuda")
    monkeypatch.setattr(build, "_import_cpp_extension", lambda: FakeCppExtension)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    build._build_cuda()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    build._build_cuda()
    first, second = calls
    assert first["name"] == "dcnv3_cuda_sm80_sm90_cu130" and second["name"] == "dcnv3_cuda_sm90ptx_cu130"
    for call in calls:
        flags = [flag for flag in call["extra_cuda_cflags"] if flag == "-gencode" or flag.startswith("arch=")]
        assert _tag_of_flags(flags) == set(call["name"].removeprefix("dcnv3_cuda_").split("_")[:-1])
