"""The DCNv3 operator: a pure-PyTorch reference, a C++ CPU kernel and a CUDA kernel behind one dispatch."""
from .dcnv3 import BACKEND_ENV, BACKENDS, dcnv3_core, resolve_backend
from .reference import dcnv3_core_reference

__all__ = ["BACKENDS", "BACKEND_ENV", "dcnv3_core", "dcnv3_core_reference", "resolve_backend"]
