"""Attention kernels for decoding (split-KV, Flash-Decoding) and prefill (FlashAttention), with a
Mosaic TPU kernel, a Triton kernel for CUDA, a Hopper-only Mosaic GPU kernel, an XLA reference and
Pallas interpret mode behind two entry points. This package knows nothing of `jaxdecode`.

- `common.py`: the problem both kernels solve (query rows, visibility, split heuristic, combine).
- `tpu.py`: the Pallas TPU kernel (also what `backend="interpret"` runs).
- `triton.py`: the Pallas Triton kernel (CUDA, Ampere and newer; what `auto` runs on CUDA).
- `gpu.py`: the Pallas Mosaic GPU kernel (Hopper wgmma; by name only).
- `reference.py`: XLA, the CPU path and the semantics.
- `dispatch.py`: `decode_attention`, `flash_attention` and the per-platform choice.
"""

from .common import num_splits_heuristic
from .dispatch import BACKENDS, decode_attention, default_num_splits, flash_attention, mosaic_gpu_runs_here

__all__ = [
    "BACKENDS",
    "decode_attention",
    "default_num_splits",
    "flash_attention",
    "mosaic_gpu_runs_here",
    "num_splits_heuristic",
]
