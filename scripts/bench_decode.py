"""Prefill and decode throughput of jaxdecode and HF transformers on the same GGUF, in one run.

    python scripts/bench_decode.py                      # the full grid (several minutes on 2 cores)
    python scripts/bench_decode.py --batch 1 --prompt 128 --engines jaxdecode:float32,hf:float32

Every configuration runs in its own subprocess (so one engine's threads and memory do not disturb the
next), with the same prompt token ids: the first N tokens of CPython's `pydoc_data` English text.
Each configuration is warmed up once (jaxdecode compiles there), then timed `--runs` times; medians.
Exactly `--new-tokens` tokens are generated (no stop token). Decode tokens/s counts the tokens
produced by the decode loop, summed over the batch; the first new token of each row belongs to the prefill.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time


def prompt_ids(length: int) -> list[int]:
    from pydoc_data.topics import topics

    from jaxdecode.api import embedded_model_path
    from jaxdecode.io.gguf import GGUFFile
    from jaxdecode.io.tokenizer import tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(GGUFFile(embedded_model_path("smollm2-135m")).metadata)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text[: length * 8])
    if len(ids) < length:
        raise SystemExit(f"not enough text for a {length}-token prompt")
    return ids[:length]


def run_jaxdecode(dtype: str, batch: int, prompt: list[int], new_tokens: int, runs: int) -> dict:
    import jaxdecode as jd

    model = jd.load("smollm2-135m", dtype=dtype)
    prompts = [prompt] * batch
    first = jd.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=())
    results = [jd.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=()) for _ in range(runs)]
    assert all(len(t) == new_tokens for t in results[0].tokens)
    return {
        "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in results),
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in results),
        "compile_s": first.compile_s,
    }


def run_hf(dtype: str, batch: int, prompt: list[int], new_tokens: int, runs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jaxdecode.api import SMOLLM2_FILE, embedded_model_path

    torch.set_num_threads(2)
    directory = embedded_model_path("smollm2-135m").parent
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_FILE, dtype=getattr(torch, dtype))
    model.eval()
    ids = torch.tensor([prompt] * batch)

    def once() -> tuple[float, float]:
        with torch.no_grad():
            start = time.perf_counter()
            model(ids, use_cache=True)
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
            total_s = time.perf_counter() - start
        assert out.shape[1] == len(prompt) + new_tokens
        # generate() runs the prefill again, then new_tokens - 1 decode steps.
        return batch * len(prompt) / prefill_s, batch * (new_tokens - 1) / max(total_s - prefill_s, 1e-9)

    once()
    timings = [once() for _ in range(runs)]
    return {
        "prefill_tokens_per_s": statistics.median(t[0] for t in timings),
        "decode_tokens_per_s": statistics.median(t[1] for t in timings),
        "compile_s": 0.0,
    }


def child(args: argparse.Namespace) -> None:
    engine, dtype = args.child.split(":")
    prompt = prompt_ids(args.prompt[0])
    fn = {"jaxdecode": run_jaxdecode, "hf": run_hf}[engine]
    row = fn(dtype, args.batch[0], prompt, args.new_tokens, args.runs)
    print(json.dumps({"engine": engine, "dtype": dtype, "batch": args.batch[0], "prompt": args.prompt[0], **row}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", default="jaxdecode:float32,jaxdecode:bfloat16,hf:float32")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    engines = args.engines.split(",")
    rows = []
    for prompt in args.prompt:
        for batch in args.batch:
            for engine in engines:
                if engine.startswith("hf:") and not _has("transformers"):
                    print(f"skipped {engine}: transformers is not installed", file=sys.stderr)
                    continue
                command = [sys.executable, __file__, "--child", engine, "--batch", str(batch), "--prompt", str(prompt)]
                command += ["--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    print(f"{engine} batch {batch} prompt {prompt} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(_format(rows[-1]), file=sys.stderr)
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "rows": rows}, f, indent=1)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _format(row: dict) -> str:
    return (
        f"{row['engine']:>9} {row['dtype']:>8} batch {row['batch']:>2} prompt {row['prompt']:>4}: "
        f"prefill {row['prefill_tokens_per_s']:8.1f} tok/s, decode {row['decode_tokens_per_s']:7.1f} tok/s"
    )


def _table(rows: list[dict]) -> str:
    """Markdown table; the ratio column compares each row's decode speed with HF float32 on the same shape."""
    base = {
        (r["batch"], r["prompt"]): r["decode_tokens_per_s"]
        for r in rows
        if (r["engine"], r["dtype"]) == ("hf", "float32")
    }
    lines = [
        "| engine | dtype | batch | prompt | prefill tok/s | decode tok/s | decode vs HF f32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base.get((r["batch"], r["prompt"]))
        ratio = f"{r['decode_tokens_per_s'] / ref:.2f}x" if ref else "-"
        lines.append(
            f"| {r['engine']} | {r['dtype']} | {r['batch']} | {r['prompt']} | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['decode_tokens_per_s']:.1f} | {ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
