"""Attention kernels for decoding and prefill.

This package knows nothing of `jaxdecode`. Today it holds the XLA reference implementations, which
are also the CPU path; the Pallas TPU and GPU kernels plug in behind the same two entry points.
"""

from .reference import decode_attention, flash_attention

__all__ = ["decode_attention", "flash_attention"]
