"""Accelerators a program can be compiled for without having one: TPU and CUDA targets, their facts,
and compile-only devices for them.

A compile-only device is enough for `jax.jit(f).lower(*abstract_args).compile()`: XLA:TPU and Mosaic
(for TPU), XLA:GPU and Triton (for CUDA) run for real, report layout errors and HBM overflows, and
`memory_analysis()` gives per-device bytes. It cannot execute anything. It needs the compilers, which
the `aot` extra installs (`pip install "jaxdecode[aot]"`: libtpu, JAX's CUDA plugin and ptxas).

The numbers in `TARGETS` are the vendors' published per-chip figures (dense, no sparsity); the GPU
memory sizes and bandwidths are those of the target configs in `gpu_targets/`, which XLA:GPU compiles
against (compute capability, SM count, shared-memory limits).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

GiB = 2**30
_GPU_TARGETS = Path(__file__).parent / "gpu_targets"
AOT_INSTALL = 'pip install "jaxdecode[aot]"'


@dataclasses.dataclass(frozen=True)
class Target:
    """One accelerator slice: `devices` chips of one kind (per-chip figures)."""

    name: str  # "v5e-4", "h100"
    platform: str  # "tpu" or "cuda"
    devices: int
    topology: str  # the compile-only topology the devices are taken from ("v5e:2x2"; "1x1x1" on CUDA)
    memory_bytes: int  # HBM per chip
    bandwidth: float  # HBM bytes/s per chip
    bf16_flops: float  # peak dense bfloat16 FLOP/s per chip
    int8_ops: float  # peak dense int8 OP/s per chip
    description: str

    @property
    def gpu_config(self) -> Path | None:
        return _GPU_TARGETS / f"{self.name.split('-')[0]}.txtpb" if self.platform == "cuda" else None


def _tpu(name: str, devices: int, topology: str, memory_gib: int, bandwidth: float, bf16: float, kind: str) -> Target:
    return Target(name, "tpu", devices, topology, memory_gib * GiB, bandwidth, bf16, 2 * bf16, kind)


def _gpu_fact(name: str, field: str) -> int:
    for line in (_GPU_TARGETS / f"{name}.txtpb").read_text().splitlines():
        key, _, value = line.strip().partition(":")
        if key == field:
            return int(value)
    raise KeyError(f"{field} missing from gpu_targets/{name}.txtpb")


def _gpu(name: str, bf16: float, description: str, devices: int = 1) -> Target:
    """`devices` GPUs of one host (topology `1x1xN`: one process, N GPUs), named `name` or `name-N`."""
    return Target(
        name if devices == 1 else f"{name}-{devices}",
        "cuda",
        devices,
        f"1x1x{devices}",
        _gpu_fact(name, "device_memory_size"),
        float(_gpu_fact(name, "memory_bandwidth")),
        bf16,
        2 * bf16,
        description,
    )


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        # TPU v5e: 16 GiB HBM2e at 819 GB/s, 197 TFLOP/s bf16, 394 TOP/s int8 per chip.
        _tpu("v5e-1", 1, "v5e:2x2", 16, 819e9, 197e12, "TPU v5e (v5litepod-1)"),
        _tpu("v5e-4", 4, "v5e:2x2", 16, 819e9, 197e12, "TPU v5e (v5litepod-4)"),
        _tpu("v5e-8", 8, "v5e:2x4", 16, 819e9, 197e12, "TPU v5e (v5litepod-8)"),
        # TPU v6e (Trillium): 32 GiB at 1640 GB/s, 918 TFLOP/s bf16.
        _tpu("v6e-1", 1, "v6e:2x2", 32, 1640e9, 918e12, "TPU v6e (Trillium)"),
        _tpu("v6e-4", 4, "v6e:2x2", 32, 1640e9, 918e12, "TPU v6e (Trillium)"),
        _tpu("v6e-8", 8, "v6e:2x4", 32, 1640e9, 918e12, "TPU v6e (Trillium)"),
        # TPU v5p-8: 4 chips (8 TensorCores, one megacore device per chip), 95 GiB at 2765 GB/s, 459 TFLOP/s.
        _tpu("v5p-8", 4, "v5p:2x2x1", 95, 2765e9, 459e12, "TPU v5p"),
        _gpu("h100", 989e12, "NVIDIA H100 SXM 80GB (sm_90)"),
        _gpu("a100", 312e12, "NVIDIA A100 SXM4 80GB (sm_80)"),
        _gpu("l4", 121e12, "NVIDIA L4 24GB (sm_89, Colab)"),
        # One 8-GPU host (an HGX / DGX node): tensor parallelism over NVLink.
        _gpu("h100", 989e12, "8x NVIDIA H100 SXM 80GB (sm_90)", devices=8),
        _gpu("a100", 312e12, "8x NVIDIA A100 SXM4 80GB (sm_80)", devices=8),
    ]
}


class TargetUnavailable(ValueError):
    """The compiler for a target is not installed here (a ValueError: the user can fix it, the CLI says how)."""


def get(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]


def compilers_installed(platform: str) -> bool:
    """Whether the compiler for `platform` ("tpu" or "cuda") is importable here (without starting it)."""
    import importlib.util

    module = "libtpu" if platform == "tpu" else "jax_cuda12_plugin"
    return importlib.util.find_spec(module) is not None


@functools.cache
def _topology(target: Target):
    from jax.experimental import topologies

    if target.platform == "cuda":
        config = target.gpu_config.read_text()
        return topologies.get_topology_desc(platform="cuda", topology=target.topology, target_config=config)
    # Without these libtpu probes for the TPU host it is not on (metadata server, worker names) and says
    # so at length; a compile-only topology needs neither. And libtpu takes a lock file that keeps a second
    # process from loading it (two TPU owners would collide): compiling without devices owns nothing, so
    # several processes may compile side by side. Set only where the user has not.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if jax.default_backend() != "tpu":
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return topologies.get_topology_desc(platform="tpu", topology_name=target.topology)


def compile_only_devices(target: Target | str) -> list:
    """`target.devices` compile-only devices for `target` (a `Target` or its name).

    Raises `TargetUnavailable` naming the install command when the compiler is missing.
    """
    target = get(target) if isinstance(target, str) else target
    if not compilers_installed(target.platform):
        raise TargetUnavailable(
            f"compiling for {target.name} needs the {'TPU' if target.platform == 'tpu' else 'CUDA'} compiler, "
            f"which is not installed: {AOT_INSTALL}"
        )
    try:
        topology = _topology(target)
    except Exception as error:  # the plugin exists but cannot start (e.g. a version other than jax's)
        raise TargetUnavailable(
            f"cannot start the {target.platform} compiler for {target.name} (jax {jax.__version__}): "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__} (the compilers come with "
            f"{AOT_INSTALL}, at jax's version)"
        ) from error
    return list(topology.devices)[: target.devices]


@dataclasses.dataclass(frozen=True)
class Roofline:
    """A device's two ceilings: a pass takes max(bytes / bandwidth, FLOPs / flops) seconds."""

    bandwidth: float  # bytes/s
    flops: float  # FLOP/s
    source: str  # "table: h100" or "measured on CPU"

    def seconds(self, bytes_read: float, flops: float) -> float:
        return max(bytes_read / self.bandwidth, flops / self.flops)


# Substrings of `device.device_kind` -> the target whose per-chip figures apply.
_KINDS = {"v5 lite": "v5e-1", "v5e": "v5e-1", "v6": "v6e-1", "v5p": "v5p-8", "h100": "h100", "a100": "a100", "l4": "l4"}


@functools.cache
def roofline_here() -> Roofline:
    """The default device's roofline: the table's figures for a known TPU / GPU (bf16 peak), else measured
    once per process (CPU): a float32 matrix-vector product over a 128 MB matrix for the bandwidth, a
    float32 [256, 2048] x [2048, 2048] product for the FLOP rate, medians of 5 after a warm-up."""
    device = jax.devices()[0]
    kind = device.device_kind.lower()
    for key, name in _KINDS.items():
        if device.platform != "cpu" and key in kind:
            return Roofline(TARGETS[name].bandwidth, TARGETS[name].bf16_flops, f"table: {name}")

    def rate(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        return sorted(times)[2]

    matmul = jax.jit(jnp.matmul)
    matrix = jnp.ones((8192, 4096), jnp.float32)
    bandwidth = matrix.nbytes / rate(matmul, jnp.ones((1, 8192), jnp.float32), matrix)
    square = jnp.ones((2048, 2048), jnp.float32)
    flops = 2 * 256 * 2048 * 2048 / rate(matmul, jnp.ones((256, 2048), jnp.float32), square)
    return Roofline(bandwidth, flops, f"measured on {device.platform.upper()}")
