"""Builds the DCNv3 C++/CUDA kernels on first use (torch.utils.cpp_extension) and caches them.

Nothing is compiled at install time, so `pip install` never needs a compiler or a GPU; the first call
that wants a kernel builds it (tens of seconds) into torch's extension cache, later calls load it.
A build that fails is remembered, with its reason, so the caller can fall back without retrying.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCE = CSRC / "dcnv3_cpu.cpp"
CUDA_SOURCE = CSRC / "dcnv3_cuda.cu"

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}


class KernelUnavailable(RuntimeError):
    """A kernel could not be built or loaded here; the message says why."""


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder, preferring CUDA_HOME / CUDA_PATH.

    torch guesses the toolkit as the grandparent of `nvcc` on the PATH, which is wrong when that `nvcc`
    is a wrapper script (as on our development machines); so we also try the conventional folders and
    accept only one that holds both bin/nvcc and the CUDA runtime library.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates += [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]
    for folder in candidates:
        has_runtime = any((folder / lib / "libcudart.so").exists() for lib in ("lib64", "lib", "targets/x86_64-linux/lib"))
        if (folder / "bin" / "nvcc").exists() and has_runtime:
            return str(folder)
    return None


def _import_cpp_extension():
    """torch.utils.cpp_extension, imported with CUDA_HOME pointing at a real toolkit when one exists, and
    without its import-time warning about a missing CUDA runtime (expected on CPU-only machines)."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        cuda_home = find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        torch_logger.setLevel(level)
    return cpp_extension


def _cpu_isa_tag() -> str:
    """A short tag of this CPU's instruction set, so `-march=native` builds are never shared across CPUs
    (a home folder mounted on several cluster nodes would otherwise load an illegal-instruction build)."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _build_cpu():
    cpp_extension = _import_cpp_extension()
    # -fno-trapping-math lets GCC vectorise std::floor in the location passes; results are unchanged (it only
    # drops the guarantee that floating-point exception flags are raised exactly).
    base_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]  # torch adds the C++ standard its headers need
    # Native ISA first (AVX2/AVX-512/NEON for the channel loops), portable flags if the compiler refuses.
    # 256-bit vectors: with 512-bit ones GCC reduces the per-point dot products through the stack, which
    # measured 30% slower in the backward on an AVX-512 EPYC.
    x86, arm = ["-march=native", "-mprefer-vector-width=256"], ["-mcpu=native"]
    native = {"x86_64": x86, "AMD64": x86, "aarch64": arm, "arm64": arm}.get(platform.machine())
    attempts = [base_flags + native, base_flags] if native else [base_flags]
    errors = []
    for index, flags in enumerate(attempts):
        name = f"dcnv3_cpu_{_cpu_isa_tag()}" if flags is not base_flags else "dcnv3_cpu_portable"
        try:
            return cpp_extension.load(name=name, sources=[str(CPU_SOURCE)], extra_cflags=flags,
                                      extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as error:  # compiler missing or refusing a flag: try the next set
            errors.append(f"{' '.join(flags)}: {error}")
            if index + 1 < len(attempts):
                logger.info("dcnv3: CPU build with %s failed, retrying with portable flags", flags)
    raise KernelUnavailable("could not build the DCNv3 CPU kernel:\n" + "\n".join(errors))


# TORCH_CUDA_ARCH_LIST's names, as torch.utils.cpp_extension expands them (combined names first).
_NAMED_ARCHES = {"Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
                 "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
                 "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
                 "Blackwell+Tegra": "11.0", "Blackwell": "10.0;10.3;12.0;12.1+PTX", "Rubin": "10.7+PTX"}
_ARCH = re.compile(r"(\d+)\.(\d+)([a-z]?)(\+ptx)?", re.IGNORECASE)


def _cuda_archs(capabilities, arch_list_env: str | None) -> list[tuple[str, bool]]:
    """The architectures to compile for, as sorted (number, with_ptx) pairs such as ("90a", True).

    TORCH_CUDA_ARCH_LIST wins when set (as in torch), else the visible GPUs' compute capabilities; one
    list feeds both the build's name and its -gencode flags, so a cached build always matches its name."""
    if arch_list_env and arch_list_env.strip().lower() != "native":
        text = arch_list_env
        for name, expansion in _NAMED_ARCHES.items():
            text = text.replace(name, expansion)
        tokens = [token for token in re.split(r"[;,\s]+", text) if token]
    else:
        tokens = [f"{major}.{minor}" for major, minor in capabilities]
    archs: dict[tuple[int, int, str], bool] = {}
    for token in tokens:
        match = _ARCH.fullmatch(token)
        if match is None:
            raise KernelUnavailable(f"TORCH_CUDA_ARCH_LIST={arch_list_env!r}: cannot read {token!r}; expected "
                                    "entries such as 8.0, 9.0a or 9.0+PTX separated by ';'")
        key = (int(match.group(1)), int(match.group(2)), match.group(3).lower())
        archs[key] = archs.get(key, False) or bool(match.group(4))
    if not archs:
        raise KernelUnavailable("no CUDA architecture to compile for: no visible GPU and TORCH_CUDA_ARCH_LIST unset")
    return [(f"{major}{minor}{suffix}", ptx) for (major, minor, suffix), ptx in sorted(archs.items())]


def _cuda_arch_tag(capabilities, arch_list_env: str | None, cuda_version: str | None) -> str:
    """A short, filesystem- and identifier-safe tag such as "sm80_sm90ptx_cu130" for the build's name, so
    torch's extension cache never hands a build for one GPU architecture (or CUDA release) to another."""
    archs = "_".join(f"sm{number}{'ptx' if ptx else ''}" for number, ptx in _cuda_archs(capabilities, arch_list_env))
    if len(archs) > 40:  # a long TORCH_CUDA_ARCH_LIST: first and last, and a digest of the whole
        names = archs.split("_")
        archs = f"{names[0]}_{names[-1]}_{hashlib.sha1(archs.encode()).hexdigest()[:8]}"
    cuda = re.sub(r"\W", "", cuda_version or "") or "none"
    return f"{archs}_cu{cuda}"


def _gencode_flags(number: str, ptx: bool = False) -> list[str]:
    """nvcc's flags for one architecture: its machine code, and its PTX too when asked (for newer GPUs)."""
    flags = ["-gencode", f"arch=compute_{number},code=sm_{number}"]
    if ptx:
        flags += ["-gencode", f"arch=compute_{number},code=compute_{number}"]
    return flags


def _cuda_arch_flags(capabilities, arch_list_env: str | None) -> list[str]:
    """The -gencode flags for the architectures `_cuda_arch_tag` names. Passing them ourselves stops torch
    from choosing its own (it adds none once a flag mentions "arch")."""
    return [flag for number, ptx in _cuda_archs(capabilities, arch_list_env) for flag in _gencode_flags(number, ptx)]


def _visible_capabilities() -> list[tuple[int, int]]:
    import torch

    return [tuple(torch.cuda.get_device_capability(index)) for index in range(torch.cuda.device_count())]


def _build_cuda():
    import torch

    if not torch.cuda.is_available():
        raise KernelUnavailable("CUDA is not available to torch")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise KernelUnavailable("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    cpp_extension = _import_cpp_extension()
    cpp_extension.CUDA_HOME = cuda_home  # torch reads its guess once, at import time
    capabilities, arch_list = _visible_capabilities(), os.environ.get("TORCH_CUDA_ARCH_LIST")
    name = f"dcnv3_cuda_{_cuda_arch_tag(capabilities, arch_list, torch.version.cuda)}"
    cuda_flags = ["-O3", "--expt-relaxed-constexpr", *_cuda_arch_flags(capabilities, arch_list)]
    try:
        return cpp_extension.load(name=name, sources=[str(CUDA_SOURCE)], extra_cflags=["-O3"],
                                  extra_cuda_cflags=cuda_flags, verbose=False)
    except Exception as error:
        raise KernelUnavailable(f"could not build the DCNv3 CUDA kernel {name}: {error}") from error


_BUILDERS = {"cpu": _build_cpu, "cuda": _build_cuda}


def load_kernel(kind: str):
    """The compiled module for `kind` ('cpu' or 'cuda'), built on first use; raises KernelUnavailable."""
    if kind in _loaded:
        return _loaded[kind]
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            raise KernelUnavailable(_failed[kind])
        logger.info("dcnv3: building the %s kernel on first use (cached afterwards)", kind)
        try:
            module = _BUILDERS[kind]()
        except KernelUnavailable as error:
            _failed[kind] = str(error)
            raise
        _loaded[kind] = module
        return module


def kernel_status(kind: str) -> tuple[bool, str]:
    """(available, reason) for a kernel, building it if it has not been tried yet."""
    try:
        load_kernel(kind)
        return True, "ok"
    except KernelUnavailable as error:
        return False, str(error)


def _torch_cxx_standard() -> int:
    """The C++ standard torch's headers need (20 for recent releases, 17 for older ones), read from the
    headers themselves rather than guessed from the version number."""
    for folder in _import_cpp_extension().include_paths():
        header = Path(folder) / "torch" / "csrc" / "api" / "include" / "torch" / "all.h"
        if header.exists():
            return 20 if "C++20" in header.read_text() else 17
    return 17


def compile_cuda_object(output: str | Path, archs=("80", "90"), nvcc: str | None = None) -> list[str]:
    """Compiles the CUDA source to an object file for the given SM architectures, without linking.

    This checks the kernel on machines that have nvcc but no GPU (CI). Returns the command it ran;
    raises subprocess.CalledProcessError with nvcc's output on a compile error.
    """
    import sysconfig

    include_paths = _import_cpp_extension().include_paths
    cuda_home = find_cuda_home()
    nvcc = nvcc or (str(Path(cuda_home) / "bin" / "nvcc") if cuda_home else "nvcc")
    try:
        includes = include_paths(device_type="cuda")
    except TypeError:  # torch < 2.5 spells it cuda=True
        includes = include_paths(cuda=True)
    if cuda_home:
        includes.append(str(Path(cuda_home) / "include"))
    includes.append(sysconfig.get_paths()["include"])
    command = [nvcc, "-c", str(CUDA_SOURCE), "-o", str(output), f"-std=c++{_torch_cxx_standard()}", "-O3", "-Xcompiler", "-fPIC",
               "-DTORCH_EXTENSION_NAME=dcnv3_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
               "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
    for arch in archs:
        command += _gencode_flags(arch)
    for folder in includes:
        command += ["-I", folder]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return command


if __name__ == "__main__":  # python -m ops.build: build what this machine can, and say what happened
    logging.basicConfig(level=logging.INFO)
    for kind in ("cpu", "cuda"):
        ok, reason = kernel_status(kind)
        print(f"{kind:5s} {'available' if ok else 'unavailable'}" + ("" if ok else f": {reason.splitlines()[0]}"))
    sys.exit(0)
