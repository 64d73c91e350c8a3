"""Compile-time cost of per-layer attention settings (Gemma 3's local/global layers) in one program.

Each layer of the decoder is its own Flax module with static settings (window, RoPE base and scaling), so
the layers are unrolled into one compiled program whatever they differ in. This script measures what that
costs: the compile time of `generate` (prefill + decode loop) for Gemma 3 270M as it is (15 sliding
layers with base 10k + 3 global layers with base 1M) and for the same weights with every layer alike.

    python scripts/compile_per_layer.py [--model gemma3-270m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jaxdecode as jd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = jd.load(args.model)
    uniform = model.config.replace(layer_types=None, sliding_window=None, rope_local_theta=None)
    variants = {"per-layer (as the model is)": model.config, "uniform layers": uniform}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # alternate, so neither variant always compiles first
        for name, config in variants.items():
            fresh = dataclasses.replace(model, config=config, executables={})
            out = jd.generate(fresh, "Photosynthesis converts", max_new_tokens=8, stop_ids=())
            times[name].append(out.compile_s)
    for name, values in times.items():
        print(f"{name}: compile {statistics.median(values):.2f} s (median of {len(values)}: {values})")


if __name__ == "__main__":
    main()
