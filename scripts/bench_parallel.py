"""SmolLM2-135M on one device vs meshes of virtual CPU devices, and what a sharded decode step sends.

    python scripts/bench_parallel.py                 # batch 8, prompt 128, 64 new tokens
    python scripts/bench_parallel.py --json parallel.json

Each configuration runs in its own process with `--xla_force_host_platform_device_count=8`. On a CPU
the virtual devices share the same cores, so this is a functional check, not a speed-up: tensor
parallelism adds collectives and splits matmuls that were already using every core.

Communication is read off the compiled decode loop (`parallel.hlo_collectives`): the all-reduces of
activations per layer per step, compared with what Megatron-style tensor parallelism must send (two
all-reduces of the `[rows, d_model]` activations per layer: after the attention output projection and
after the MLP down projection). Bytes are the reduced tensor's size; a ring all-reduce moves
`2 (M - 1) / M` times that through each device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MESHES = [None, (8, 1), (1, 3), (2, 3)]  # (data, model); None: one device, no mesh


def child(mesh: tuple[int, int] | None, batch: int, prompt_len: int, new_tokens: int) -> dict:
    import numpy as np

    import jaxdecode as jd
    from jaxdecode import parallel

    model = jd.load("smollm2-135m")
    if mesh is not None:
        model = jd.shard(model, jd.make_mesh(data=mesh[0], model=mesh[1]))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, size=prompt_len).tolist() for _ in range(batch)]
    jd.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=())  # compile
    runs = [jd.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=()) for _ in range(3)]
    row = {
        "mesh": "1 device" if mesh is None else f"data={mesh[0]} x model={mesh[1]}",
        "decode_tokens_per_s": float(np.median([r.decode_tokens_per_s for r in runs])),
        "prefill_tokens_per_s": float(np.median([r.prefill_tokens_per_s for r in runs])),
    }
    if mesh is not None:
        (exe,) = [e for k, e in model.executables.items() if k[0] == "decode_loop"]
        rows_per_shard, d = batch // mesh[0], model.config.d_model
        ops = parallel.hlo_collectives(exe.as_text())
        activation = [o for o in ops if o[0] == "all-reduce" and o[2] == (rows_per_shard, 1, d)]
        other = [o for o in ops if o not in activation]
        per_layer = max(len(activation) - 1, 0) / model.config.num_layers  # minus the embedding lookup's
        row["activation_all_reduces_per_layer"] = per_layer
        row["activation_bytes_per_layer"] = per_layer * rows_per_shard * d * 4
        row["megatron_bytes_per_layer"] = 2 * rows_per_shard * d * 4 if mesh[1] > 1 else 0
        row["other_collectives"] = [f"{op} {dtype}{list(shape)}" for op, dtype, shape in other]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mesh = json.loads(args.child)
        print(json.dumps(child(tuple(mesh) if mesh else None, args.batch, args.prompt, args.new_tokens)))
        return
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    rows = []
    for mesh in MESHES:
        cmd = [sys.executable, __file__, "--child", json.dumps(mesh), "--batch", str(args.batch)]
        cmd += ["--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["decode_tokens_per_s"]
    print(f"\n| mesh | decode tok/s (batch {args.batch}) | vs 1 device | all-reduces/layer | bytes/layer | Megatron |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mesh']} | {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base:.2f}x | "
            f"{r.get('activation_all_reduces_per_layer', '-')} | {r.get('activation_bytes_per_layer', '-')} | "
            f"{r.get('megatron_bytes_per_layer', '-')} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
