"""jaxdecode: fast LLM inference in JAX/XLA.

import jaxdecode as jd
model = jd.load("smollm2-135m")
out = jd.generate(model, "The capital of France is", max_new_tokens=16)
print(out.text[0])
"""

from . import cpu

cpu.apply_tuning()  # before JAX creates its CPU backend: XLA reads XLA_FLAGS then (cpu.py)

from . import checkpoint, quantize
from .api import (
    GenerationResult,
    Model,
    StreamPiece,
    expert_load,
    forward,
    generate,
    load,
    perplexity,
    save,
    shard,
    stream,
)
from .checkpoint import CheckpointError
from .config import ModelConfig, RopeScaling
from .flash import Offload
from .kv_cache import KVCache, init_cache
from .loop import GenerateOutput, generate_tokens
from .model import apply, init_params
from .parallel import make_mesh
from .quantize import QuantizedWeight
from .sampling import Sampling
from .speculative import DraftModel, SelfSpeculative

__all__ = [
    "CheckpointError",
    "DraftModel",
    "GenerateOutput",
    "GenerationResult",
    "KVCache",
    "Model",
    "ModelConfig",
    "Offload",
    "QuantizedWeight",
    "RopeScaling",
    "Sampling",
    "SelfSpeculative",
    "StreamPiece",
    "apply",
    "checkpoint",
    "expert_load",
    "forward",
    "generate",
    "generate_tokens",
    "init_cache",
    "init_params",
    "load",
    "make_mesh",
    "perplexity",
    "quantize",
    "save",
    "shard",
    "stream",
]
