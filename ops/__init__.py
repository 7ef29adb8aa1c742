"""Kernels: one function per op, a reference in plain torch and fast paths chosen by device."""
from .adamw import adamw, adamw_
from .attention import attention
from .cross_entropy import cross_entropy
from .norm import rms_norm
from .rotary import rope_table, rotary
from .swiglu import swiglu

__all__ = ["rms_norm", "rope_table", "rotary", "attention", "swiglu", "cross_entropy",
           "adamw", "adamw_"]
