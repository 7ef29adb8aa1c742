"""Kernels: one function per op, a reference in plain torch and fast paths chosen by device.

Every op takes impl="auto" | "reference" | "fused" | "npu"; see each function's docstring.
"""
from ._dispatch import is_dtensor
from .adamw import adamw, adamw_
from .attention import attention
from .cross_entropy import cross_entropy
from .norm import rms_norm
from .rotary import rope_table, rotary
from .swiglu import swiglu, swiglu_packed

__all__ = ["rms_norm", "rope_table", "rotary", "attention", "swiglu", "swiglu_packed",
           "cross_entropy", "adamw", "adamw_", "is_dtensor"]
