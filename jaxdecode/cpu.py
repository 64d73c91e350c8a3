"""The host CPU's facts, and the XLA CPU compiler flags chosen for it when jaxdecode is imported.

XLA's CPU code generation is tuned per CPU, and the loops jaxdecode's quantized weights compile to
(dequantization fused into the matrix-vector product, `quantize.py`) are sensitive to it: on Intel
CPUs with AVX-512, XLA emits 256-bit vectors unless told otherwise (LLVM's "prefer-256-bit" for
those cores). Measured on an Intel Xeon (2 vCPUs, AVX-512 with VNNI/BF16/FP16, AMX), SmolLM2-135M,
batch 1, decode tok/s without -> with `--xla_cpu_prefer_vector_width=512`: float32 33.0 -> 34.1,
int8 53.6 -> 70.9, int4 g128 46.8 -> 60.0, native Q4_1 55.3 -> 66.1 (README, "CPU speed on Intel and
AMD"). AMD
EPYC machines seen here (AVX2) get no flag; an AMD CPU with AVX-512 (Zen 4) is left alone because it
has not been measured.

The choice is applied once, at import (`apply_tuning`), by adding to the `XLA_FLAGS` environment
variable before JAX creates its CPU backend. The user stays in charge: a flag already present in
`XLA_FLAGS` keeps the user's value, `JAXDECODE_CPU_TUNING=0` turns the tuning off, and if JAX's backends
already exist when jaxdecode is imported (JAX ran something first) nothing is changed, which
`jaxdecode doctor` reports.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform

# The /proc/cpuinfo flags that decide XLA's code generation and the peers' kernels (named in every figure).
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
OPT_OUT = "JAXDECODE_CPU_TUNING"


@dataclasses.dataclass(frozen=True)
class CPU:
    vendor: str  # "GenuineIntel", "AuthenticAMD", ... ("" where unknown)
    model: str  # /proc/cpuinfo's model name
    features: tuple[str, ...]  # those of FEATURES the CPU has
    cores: int

    def describe(self) -> str:
        """One line for a figure: "Intel(R) Xeon(R) Processor (GenuineIntel), 2 cores, avx2 fma avx512f ..."."""
        vendor = f" ({self.vendor})" if self.vendor else ""
        return f"{self.model}{vendor}, {self.cores} cores, {' '.join(self.features) or 'no AVX2'}"


@functools.cache
def _proc_cpuinfo() -> str:
    """/proc/cpuinfo, read once per process (import, doctor and the bench all ask)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def host_cpu(cpuinfo: str | None = None) -> CPU:
    """This machine's CPU, from /proc/cpuinfo (`cpuinfo`: its text, for tests); what it lacks stays empty."""
    if cpuinfo is None:
        cpuinfo = _proc_cpuinfo()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    return CPU(
        vendor=fields.get("vendor_id", ""),
        model=fields.get("model name", platform.processor() or platform.machine()),
        features=tuple(f for f in FEATURES if f in flags),
        cores=os.cpu_count() or 1,
    )


def tuned_flags(cpu: CPU) -> dict[str, str]:
    """The XLA CPU flags for `cpu` (name without the leading dashes -> value); empty where none measured better."""
    if cpu.vendor == "GenuineIntel" and "avx512f" in cpu.features:
        return {"xla_cpu_prefer_vector_width": "512"}
    return {}


def _flag_names(xla_flags: str) -> set[str]:
    return {item.lstrip("-").split("=", 1)[0] for item in xla_flags.split()}


def _opted_out(environ: dict[str, str] | os._Environ) -> bool:
    return environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off")


def tuning_to_add(cpu: CPU, environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The tuned flags not already set by the user in `environ["XLA_FLAGS"]`; none when opted out."""
    if _opted_out(environ):
        return {}
    present = _flag_names(environ.get("XLA_FLAGS", ""))
    return {name: value for name, value in tuned_flags(cpu).items() if name not in present}


def apply_tuning(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """Add this CPU's tuned flags to `XLA_FLAGS` if JAX's backends do not exist yet. Returns what was added."""
    from jax._src import xla_bridge  # no public query for "has a backend been created"

    if xla_bridge.backends_are_initialized():
        return {}
    added = tuning_to_add(host_cpu(), environ)
    if added:
        extra = " ".join(f"--{name}={value}" for name, value in added.items())
        environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {extra}".strip()
    return added


def tuning_report(cpu: CPU | None = None, environ: dict[str, str] | os._Environ = os.environ) -> str:
    """What the tuning chose for this CPU and what XLA_FLAGS holds now (for `doctor` and the bench)."""
    cpu = cpu or host_cpu()
    wanted = tuned_flags(cpu)
    tuned = " ".join(f"--{n}={v}" for n, v in wanted.items()) or "-"
    given = environ.get("XLA_FLAGS", "")
    if not wanted:
        choice = "none for this CPU"
    elif _opted_out(environ):
        choice = f"turned off by {OPT_OUT}"
    elif set(tuned.split()) <= set(given.split()):
        choice = "in effect"
    elif set(wanted) <= _flag_names(given):
        choice = "the user's own values in XLA_FLAGS kept"
    else:
        choice = "not applied: JAX's backend existed before jaxdecode was imported"
    return f"CPU tuning {tuned}: {choice}; XLA_FLAGS={given!r}"
