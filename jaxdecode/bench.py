"""`jaxdecode bench`: jaxdecode side by side with its peers on the same model, prompt ids and machine.

Each (engine, shape) runs in its own process: the model is loaded, one warm-up generation runs (jaxdecode
compiles there; its compile time is reported separately), then `--runs` timed generations, medians
reported. The engine order alternates from one shape to the next, so no engine always runs first.
Prompts are the first N tokens of CPython's `pydoc_data` English text, the same ids for every engine;
exactly `new_tokens` tokens are generated greedily (no stop token).

Engines: jaxdecode (float32 by default, `--dtypes`), HF transformers loading the GGUF with
`gguf_file=` (dequantised; float32 and bfloat16), llama.cpp through llama-cpp-python on the GGUF as
stored (Q4_1), 2 threads, its AMX path disabled (it crashes on some CPUs; the AVX-512 path runs).
A peer that is not installed, or cannot run a shape, is reported as skipped, never as a failure.

Measured: prefill tokens/s, decode tokens/s (decode steps after the first token, summed over the
batch), time to first token (prefill + first sample, after warm-up), peak resident memory of the
engine's process.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from .cpu import host_cpu

SUITES: dict[str, dict[str, Any]] = {
    "decode": {"batch": [1], "prompt": [128, 1024], "new_tokens": 128},
    "batch": {"batch": [1, 4, 16], "prompt": [128], "new_tokens": 64},
    "long": {"batch": [1], "prompt": [1024, 2048, 4096, 8000], "new_tokens": 64},
    # jaxdecode float32 with each weight format vs llama.cpp on the GGUF's Q4_1, plus bytes and perplexity
    "quant": {"batch": [1], "prompt": [128], "new_tokens": 128, "quants": [None, "int8", "int4", "native"]},
    # Where each weight format's decode step goes (`profile.py`): XLA's profile, beside the weight-read floor
    "profile": {"batch": [1], "prompt": [128], "new_tokens": 64, "quants": [None, "int8", "int4", "native"]},
}
# Speculative decoding (its own runner): plain vs speculative decode on one prefilled cache per shape.
SPEC_SUITE = {"batch": [1, 4, 16], "context": [1024, 4096, 8000], "gamma": [1, 2, 3, 4], "budget": [256, 512]}
INT4_GROUP = 128
PEERS = ("hf", "llamacpp")
PEER_MODULES = {"hf": ("transformers", "torch"), "llamacpp": ("llama_cpp",)}
THREADS = 2


DEFAULT_MODEL = "smollm2-135m"


def model_file(model: str):
    """The GGUF file behind `--model` (an embedded name or a .gguf path): the peers load the same file."""
    from .io.sources import resolve_source

    path = resolve_source(model)
    if not path.is_file():
        raise ValueError(f"bench --model needs an embedded name or a .gguf file (its peers load GGUF), got {model}")
    return path


@functools.cache
def _tokenizer(model: str):
    from .io.gguf import GGUFFile
    from .io.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFFile(model_file(model)).metadata)


def prompt_ids(length: int, model: str = DEFAULT_MODEL) -> list[int]:
    """The first `length` token ids of CPython's `pydoc_data` topics (English prose), the model's tokenizer
    (as text ids: no BOS)."""
    from pydoc_data.topics import topics

    tokenizer = _tokenizer(model)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.backend.encode(text[: length * 8], add_special_tokens=False).ids
    if len(ids) < length:
        raise SystemExit(f"not enough text for a {length}-token prompt")
    return ids[:length]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _medians(once, runs: int) -> dict:
    """A warm-up call of `once() -> (prefill tok/s, decode tok/s, ttft s)`, then the medians of `runs` calls."""
    once()
    timings = [once() for _ in range(runs)]
    return {
        "prefill_tokens_per_s": statistics.median(t[0] for t in timings),
        "decode_tokens_per_s": statistics.median(t[1] for t in timings),
        "ttft_s": statistics.median(t[2] for t in timings),
    }


def run_jaxdecode(spec: dict, prompt: list[int], runs: int) -> dict:
    import jaxdecode as jd

    batch, new_tokens = spec["batch"], spec["new_tokens"]
    model = jd.load(spec["model"], dtype=spec["dtype"], quant=spec["quant"], group_size=INT4_GROUP)
    extra = {}
    if spec["ppl"]:
        ppl, _ = jd.perplexity(model, prompt_ids(spec["ppl_tokens"], spec["model"]), window=spec["ppl_window"])
        extra = {"perplexity": ppl, "param_bytes": jd.quantize.param_bytes(model.params)}
    prompts = [prompt] * batch
    first = jd.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=())
    results = [jd.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=()) for _ in range(runs)]
    assert all(len(t) == new_tokens for t in results[0].tokens)
    return {
        "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in results),
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in results),
        "ttft_s": statistics.median(r.prefill_s for r in results),
        "compile_s": first.compile_s,
        **extra,
    }


def run_hf(spec: dict, prompt: list[int], runs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    dtype, batch, new_tokens = spec["dtype"], spec["batch"], spec["new_tokens"]
    torch.set_num_threads(THREADS)
    path = model_file(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype))
    model.eval()
    ids = torch.tensor([prompt] * batch)

    class Clock(BaseStreamer):
        """Timestamps of generate()'s streamer calls: the prompt, then one call per new token."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def once() -> tuple[float, float, float]:
        clock = Clock()
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(
                ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        assert out.shape[1] == len(prompt) + new_tokens and len(clock.times) == new_tokens + 1
        ttft = clock.times[1] - start  # prefill and the first token
        decode = clock.times[-1] - clock.times[1]  # new_tokens - 1 decode steps
        return batch * len(prompt) / ttft, batch * (new_tokens - 1) / decode, ttft

    return _medians(once, runs)


def run_llamacpp(spec: dict, prompt: list[int], runs: int) -> dict:
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    # llama.cpp's AMX buffers crash on some CPUs (BRIEF §5): keep weights in the plain AVX-512 path.
    default_params = low_level.llama_model_default_params

    def params_without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = params_without_extra_buffers
    new_tokens, with_ppl = spec["new_tokens"], spec["ppl"]
    path = model_file(spec["model"])
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=max(len(prompt) + new_tokens + 16, spec["ppl_window"] if with_ppl else 0),
        n_batch=512,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        logits_all=with_ppl,  # perplexity needs every position's logits
        verbose=False,
    )
    extra = {}
    if with_ppl:
        from .io.gguf import GGUFFile

        perplexity = _llamacpp_perplexity(llm, prompt_ids(spec["ppl_tokens"], spec["model"]), spec["ppl_window"])
        extra = {"perplexity": perplexity, "param_bytes": GGUFFile(path).data_bytes}

    def once() -> tuple[float, float, float]:
        llm.reset()  # no reuse of the previous run's cache for the same prompt
        start = time.perf_counter()
        tokens = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
        next(tokens)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(tokens)
        decode = time.perf_counter() - start
        return len(prompt) / ttft, (new_tokens - 1) / decode, ttft

    return {**_medians(once, runs), **extra}


def _llamacpp_perplexity(llm, ids: list[int], window_size: int) -> float:
    """Perplexity scored exactly as `jaxdecode.perplexity` does (same ids, same windows, no BOS), from
    llama.cpp's logits, log-softmax in float64."""
    total, count = 0.0, 0
    for start in range(0, len(ids), window_size):
        window = ids[start : start + window_size]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], np.float64)
        top = logits.max(axis=-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
        total -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return float(np.exp(total / count))


RUNNERS = {"jaxdecode": run_jaxdecode, "hf": run_hf, "llamacpp": run_llamacpp}


def _skip_reason(engine: str, batch: int) -> str | None:
    missing = [m for m in PEER_MODULES.get(engine, ()) if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -e '.[peers]')"
    if engine == "llamacpp" and batch > 1:
        return "llama-cpp-python generates one sequence at a time"
    return None


def machine() -> str:
    """The machine a figure was measured on: the CPU (model, vendor, the features that matter), memory,
    OS and the XLA CPU flags in effect (`cpu.py`)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    flags = os.environ.get("XLA_FLAGS", "")
    return (
        f"{host_cpu().describe()}, {memory:.0f} GiB, {platform.system()} {platform.release()}, "
        f"XLA_FLAGS={flags or '(none)'}"
    )


def gguf_file_type(path) -> str:
    """The file's weight format as llama.cpp names it ("q4_1", "q4_k_m", ...): the llama.cpp rows' label."""
    import gguf

    from .io.gguf import GGUFFile

    file_type = GGUFFile(path).metadata.get("general.file_type")
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        return "gguf"


def _engines(args: argparse.Namespace, suite: dict) -> list[tuple[str, str, str | None]]:
    """(engine, dtype, weight format) triples; the quant suite runs jaxdecode once per format and no HF."""
    quants = args.quants if args.quants is not None else suite.get("quants", [None])
    engines = [("jaxdecode", d, q) for d in args.dtypes for q in quants]
    if "hf" in args.peers and "quants" not in suite:
        engines += [("hf", d, None) for d in args.hf_dtypes]
    if "llamacpp" in args.peers:
        stored = gguf_file_type(model_file(args.model))
        engines.append(("llamacpp", stored, stored))
    return engines


def run_suite(args: argparse.Namespace, name: str) -> list[dict]:
    suite = SUITES[name]
    batches, prompts = args.batch or suite["batch"], args.prompt or suite["prompt"]
    new_tokens = args.new_tokens or suite["new_tokens"]
    engines = _engines(args, suite)
    rows, shape_index = [], 0
    for prompt in prompts:
        for batch in batches:
            order = engines if shape_index % 2 == 0 else engines[::-1]
            shape_index += 1
            for engine, dtype, quant in order:
                base = {"suite": name, "model": args.model, "engine": engine, "dtype": dtype, "quant": quant}
                base.update(batch=batch, prompt=prompt, new_tokens=new_tokens, ppl=name == "quant" or args.ppl)
                if base["ppl"] and engine != "hf":
                    base.update(ppl_tokens=args.ppl_tokens, ppl_window=args.ppl_window)
                else:
                    base["ppl"] = False
                reason = _skip_reason(engine, batch)
                if reason is None:
                    command = [sys.executable, "-m", "jaxdecode.bench", "--child", json.dumps(base)]
                    command += ["--runs", str(args.runs)]
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode == 0:
                        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                        print(_line(rows[-1]), file=sys.stderr, flush=True)
                        continue
                    last_line = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
                    if engine == "jaxdecode":  # our own failure is a bug, not a skipped peer
                        raise RuntimeError(f"jaxdecode {dtype} batch {batch} prompt {prompt} failed: {last_line}")
                    reason = "failed: " + last_line
                rows.append({**base, "skipped": reason})
                print(f"{engine} {dtype} batch {batch} prompt {prompt}: skipped ({reason})", file=sys.stderr)
    return rows


def run_profile(spec: dict, prompt: list[int], runs: int) -> dict:
    import jaxdecode as jd

    from .profile import profile_decode

    model = jd.load(spec["model"], dtype=spec["dtype"], quant=spec["quant"], group_size=INT4_GROUP)
    return profile_decode(model, prompt, spec["batch"], spec["new_tokens"], runs)


def child(spec: dict, runs: int) -> dict:
    prompt = prompt_ids(spec["prompt"], spec["model"])
    runner = run_profile if spec["suite"] == "profile" else RUNNERS[spec["engine"]]
    measured = runner(spec, prompt, runs)
    return {**spec, **measured, "peak_rss_mb": _peak_rss_mb()}


def _label(r: dict) -> str:
    """engine and dtype, plus jaxdecode's weight format when it is quantized."""
    quant = r.get("quant")
    return f"{r['engine']} {r['dtype']}" + (f" {quant}" if quant and quant != r["dtype"] else "")


def _line(r: dict) -> str:
    if r["suite"] == "profile":
        from .profile import report

        return report(r)
    extra = ""
    if "perplexity" in r:
        extra = f", perplexity {r['perplexity']:.4f}, params {r['param_bytes'] / 1e6:.1f} MB"
    return (
        f"{_label(r)} batch {r['batch']} prompt {r['prompt']}: prefill "
        f"{r['prefill_tokens_per_s']:.1f} tok/s, decode {r['decode_tokens_per_s']:.1f} tok/s, "
        f"ttft {r['ttft_s'] * 1000:.0f} ms, peak RSS {r['peak_rss_mb']:.0f} MB{extra}"
    )


def table(rows: list[dict]) -> str:
    """Markdown: one line per measured row; jaxdecode rows carry their decode ratio to each peer row of
    the same shape."""
    measured = [r for r in rows if "skipped" not in r]
    peers = list(dict.fromkeys(_label(r) for r in measured if r["engine"] != "jaxdecode"))
    header = "| suite | engine | batch | prompt | prefill tok/s | decode tok/s | TTFT ms | peak RSS MB |"
    header += "".join(f" decode vs {p} |" for p in peers)
    lines = [header, "|" + "---|" * (8 + len(peers))]
    for r in measured:
        cells = [r["suite"], _label(r), r["batch"], r["prompt"], f"{r['prefill_tokens_per_s']:.0f}"]
        cells += [f"{r['decode_tokens_per_s']:.1f}", f"{r['ttft_s'] * 1000:.0f}", f"{r['peak_rss_mb']:.0f}"]
        for peer in peers:
            ref = next(
                (p for p in measured if _label(p) == peer and all(p[k] == r[k] for k in ("suite", "batch", "prompt"))),
                None,
            )
            ratio = (
                r["decode_tokens_per_s"] / ref["decode_tokens_per_s"] if ref and r["engine"] == "jaxdecode" else None
            )
            cells.append(f"{ratio:.2f}x" if ratio else "-")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        f"skipped: {_label(r)} batch {r['batch']} prompt {r['prompt']}: {r['skipped']}" for r in rows if "skipped" in r
    ]
    return "\n".join(lines + quant_table(measured))


def quant_table(measured: list[dict]) -> list[str]:
    """The quant suite's summary: bytes, decode and perplexity of each format, against jaxdecode float32
    and llama.cpp from the same run."""
    rows = [r for r in measured if "perplexity" in r]
    base = next((r for r in rows if r["engine"] == "jaxdecode" and not r["quant"]), None)
    peer = next((r for r in rows if r["engine"] == "llamacpp"), None)
    if not rows:
        return []
    lines = [
        "",
        "| weights | params MB | decode tok/s | decode vs f32 | decode vs llama.cpp "
        f"| perplexity ({rows[0]['ppl_tokens']} tok) | ppl vs f32 | ppl vs llama.cpp |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratio(r: dict, ref: dict | None, key: str) -> str:
        return f"{r[key] / ref[key]:.3f}x" if ref else "-"

    for r in rows:
        cells = [_label(r), f"{r['param_bytes'] / 1e6:.1f}", f"{r['decode_tokens_per_s']:.1f}"]
        cells += [ratio(r, base, "decode_tokens_per_s"), ratio(r, peer, "decode_tokens_per_s")]
        cells += [f"{r['perplexity']:.4f}", ratio(r, base, "perplexity"), ratio(r, peer, "perplexity")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], path: str, model: str = DEFAULT_MODEL) -> None:
    """Decode tokens/s against prompt length (batch 1) and against batch size, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "skipped" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x_key, fixed_key, fixed in ((axes[0], "prompt", "batch", 1), (axes[1], "batch", "prompt", None)):
        if fixed is None:  # the batch plot uses the shortest prompt measured
            fixed = min((r["prompt"] for r in measured), default=0)
        for label in dict.fromkeys(map(_label, measured)):
            by_x = {  # a shape measured by two suites: one point
                r[x_key]: r["decode_tokens_per_s"] for r in measured if _label(r) == label and r[fixed_key] == fixed
            }
            points = sorted(by_x.items())
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xlabel("context (prompt tokens)" if x_key == "prompt" else "batch size")
        ax.set_ylabel("decode tokens/s (summed over the batch)")
        ax.set_title(f"{fixed_key} = {fixed}")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{model} decode throughput, same machine, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--suite",
        default="decode",
        help=f"one of {', '.join([*SUITES, 'kernels', 'spec', 'flash'])}; several of "
        f"{', '.join(s for s in SUITES if s != 'profile')} may be comma-separated (the others run alone)",
    )
    p.add_argument("--peers", default="hf,llamacpp", help="comma-separated: hf, llamacpp (or 'none')")
    p.add_argument("--dtypes", default="float32", help="jaxdecode dtypes, comma-separated")
    p.add_argument("--hf-dtypes", default="float32,bfloat16", help="HF transformers dtypes, comma-separated")
    p.add_argument("--runs", type=int, default=3, help="timed runs per engine and shape (median), after a warm-up")
    p.add_argument("--batch", type=int, nargs="+", help="override the suite's batch sizes")
    p.add_argument("--prompt", type=int, nargs="+", help="override the suite's prompt lengths")
    p.add_argument("--new-tokens", type=int, help="override the suite's number of new tokens")
    p.add_argument("--context", type=int, nargs="+", help="spec suite: context lengths (prompt tokens)")
    p.add_argument("--gamma", type=int, nargs="+", help="spec suite: tokens drafted per round")
    p.add_argument("--budget", type=int, nargs="+", help="spec suite: KV entries the self-draft reads")
    p.add_argument(
        "--draft",
        nargs="+",
        choices=["gather", "in-place", "int8"],
        default=["gather"],
        help="spec suite: how the self-draft works: a gathered copy of its view, the view read in place (through "
        "the attention's window; on CPU XLA attention reads the whole cache for it), or int8 weights on the copy",
    )
    p.add_argument("--budget-mb", type=float, nargs="+", help="flash suite: memory budgets for weights (default 380)")
    p.add_argument("--fractions", help="flash suite: neuron fractions for flash and oracle, comma-separated")
    p.add_argument("--flash-dir", help="flash suite: the flash checkpoint (made from --model when missing)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name or .gguf file (the peers load the same file)")
    p.add_argument("--quants", help="jaxdecode weight formats, comma-separated: none, int8, int4, native")
    p.add_argument(
        "--ppl", action="store_true", help="also score perplexity (jaxdecode and llama.cpp; the quant suite always)"
    )
    p.add_argument("--ppl-tokens", type=int, default=2048, help="perplexity over the first N pydoc_data tokens")
    p.add_argument("--ppl-window", type=int, default=1024, help="in non-overlapping windows of W tokens")
    p.add_argument("--json", help="write {machine, rows} here")
    p.add_argument("--plot", help="write a PNG of decode tokens/s vs context and vs batch here")


def run(args: argparse.Namespace) -> int:
    """The CLI's `bench` command. Raises ValueError on bad arguments (the CLI prints one line)."""
    suites = args.suite.split(",")
    for suite in suites:
        if suite not in SUITES and suites not in (["kernels"], ["spec"], ["flash"]):
            raise ValueError(f"unknown suite {suite!r}; choose from {', '.join([*SUITES, 'kernels', 'spec', 'flash'])}")
    if suites == ["kernels"]:
        from pallas_kernels import benchmark

        benchmark.main([] if args.json is None else ["--json", args.json])
        return 0
    args.peers = [] if args.peers in ("", "none") else args.peers.split(",")
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)} (comma-separated) or 'none'")
    args.dtypes, args.hf_dtypes = args.dtypes.split(","), args.hf_dtypes.split(",")
    bad = [d for d in args.dtypes + args.hf_dtypes if d not in ("float32", "bfloat16")]
    if bad:
        raise ValueError(f"unsupported dtype {bad[0]!r}; use float32 and/or bfloat16")
    if args.ppl_window < 2 or args.ppl_tokens < args.ppl_window:
        raise ValueError(f"need 2 <= --ppl-window <= --ppl-tokens, got {args.ppl_window} and {args.ppl_tokens}")
    if args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    if args.quants is not None:
        args.quants = [None if q == "none" else q for q in args.quants.split(",")]
        bad = [q for q in args.quants if q not in (None, "int8", "int4", "native")]
        if bad:
            raise ValueError(f"unknown weight format {bad[0]!r}; use none, int8, int4 and/or native")
    model_file(args.model)  # a bad --model fails here, with one line
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install -e '.[peers]'")
    if any(n < 1 for n in (*(args.gamma or [1]), *(args.budget or [17]), *(args.context or [1]))):
        raise ValueError("--gamma, --budget and --context take positive numbers")
    this_machine = machine()
    print(f"machine: {this_machine}", file=sys.stderr)
    if any(b <= 0 for b in args.budget_mb or []):
        raise ValueError("--budget-mb takes positive numbers of megabytes")
    spec, flash_suite = suites == ["spec"], suites == ["flash"]
    if "profile" in suites and suites != ["profile"]:
        raise ValueError("the profile suite runs alone: --suite profile")
    if suites == ["profile"]:
        args.peers = []  # a profile of jaxdecode's own step
        rows = run_suite(args, "profile")
        print("\n\n".join(_line(r) for r in rows if "skipped" not in r))
    elif spec:
        rows = run_spec(args)
        print(spec_table(rows))
    elif flash_suite:
        rows = run_flash(args)
        print(flash_table(rows))
    else:
        rows = [row for suite in suites for row in run_suite(args, suite)]
        print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": this_machine, "suite": args.suite, "rows": rows}, f, indent=1)
    if args.plot:
        (spec_plot(rows, args.plot) if spec else flash_plot(rows, args.plot)) if spec or flash_suite else plot(
            rows, args.plot, args.model
        )
    return 0


# ------------------------------------------------------------------------------------------------
# The spec suite.


def spec_child(shape: dict, runs: int) -> list[dict]:
    """One (batch, context): prefill one row of `context` prompt tokens, copy its cache to every row
    (prefilling 16 x 8000 tokens would take minutes and measure nothing new), then time the plain
    decode loop and the self-speculative loop for each (gamma, budget) and for the cost model's gamma,
    each from a fresh copy of the same state, `new_tokens` greedy tokens per row, median of `runs`."""
    import jax
    import jax.numpy as jnp

    import jaxdecode as jd

    from . import engine, speculative, targets
    from .loop import Speculation, decode_loop

    batch, context, new_tokens = shape["batch"], shape["context"], shape["new_tokens"]
    model = jd.load(shape["model"])
    max_gamma = max([*shape["gamma"], 8])
    run = engine.start(
        model, [prompt_ids(context, shape["model"])], max_new_tokens=new_tokens, stop_ids=(), reserve_gamma=max_gamma
    )
    tile = jax.jit(lambda tree: jax.tree.map(lambda a: jnp.repeat(a, batch, axis=0) if jnp.ndim(a) else a, tree))
    sampling = tile(run.sampling)

    def timed(speculation, draft_params=None):
        # One batch-sized state at a time (16 x 8000 tokens of float32 cache is 6 GB): tiled afresh from
        # the one-row state for every run, and the loop updates it in place (donated).
        settings = dataclasses.replace(run.settings, speculation=speculation)
        args = (model.params, jax.eval_shape(tile, run.state), sampling, run.limit, draft_params)
        exe, _ = engine.compiled(model, decode_loop, settings, args, donate=(1,))
        seconds, out = [], None
        for _ in range(runs + 1):  # the first run warms up
            out = None
            fresh = jax.block_until_ready(tile(run.state))
            start = time.perf_counter()
            out = jax.block_until_ready(exe(model.params, fresh, sampling, run.limit, draft_params))
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds[1:]), out

    plain_s, _ = timed(None)
    plain = batch * (new_tokens - 1) / plain_s
    roofline = targets.roofline_here()
    costs = dict(costs=speculative.PassCosts.of(model.config, model.params), roofline=roofline)
    costs.update(batch=batch, context=context)
    rows = []

    def cost_model_gamma(budget: int) -> int:  # with the acceptance measured at this shape and budget
        measured = [r["acceptance"] for r in rows if r["budget"] == budget and not r["gamma_from_cost_model"]]
        acceptance = float(np.mean(measured)) if measured else 0.8
        return speculative.choose_gamma(acceptance, budget=budget, **costs)

    configs = [(g, b, False, d) for d in shape["draft"] for b in shape["budget"] for g in shape["gamma"]]
    configs += [(None, b, True, shape["draft"][0]) for b in shape["budget"]]
    for gamma, budget, chosen, view in configs:
        gamma = cost_model_gamma(budget) if gamma is None else gamma
        if gamma == 0:  # the cost model chose plain decoding
            plain_again, _ = timed(None)
            rows.append(
                _spec_row(
                    shape, 0, budget, True, view, float("nan"), plain, batch * (new_tokens - 1) / plain_again, 1.0
                )
            )
            print(_spec_line(rows[-1]), file=sys.stderr, flush=True)
            continue
        weights = "int8" if view == "int8" else "same"
        draft_params = engine.draft_params(model, jd.SelfSpeculative(budget, 16, gamma, draft_weights=weights))
        spec_s, out = timed(Speculation(gamma, budget, 16, in_place=view == "in-place"), draft_params)
        produced = np.minimum(np.asarray(out.written), new_tokens) - 1
        acceptance = float(np.sum(out.accepted) / max(np.sum(out.drafted), 1))
        spec = float(np.sum(produced)) / spec_s
        predicted = speculative.predicted_speedup(acceptance, gamma, budget=budget, **costs)
        rows.append(_spec_row(shape, gamma, budget, chosen, view, acceptance, plain, spec, predicted))
        print(_spec_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _spec_row(shape, gamma, budget, chosen, view, acceptance, plain, spec, predicted) -> dict:
    return {
        "suite": "spec",
        "batch": shape["batch"],
        "context": shape["context"],
        "gamma": gamma,
        "gamma_from_cost_model": chosen,
        "budget": budget,
        "draft": view,
        "acceptance": acceptance,
        "plain_tokens_per_s": plain,
        "spec_tokens_per_s": spec,
        "speedup": spec / plain,
        "predicted_speedup": predicted,
        "new_tokens": shape["new_tokens"],
    }


def _spec_line(r: dict) -> str:
    how = "cost model" if r["gamma_from_cost_model"] else "fixed"
    return (
        f"batch {r['batch']} context {r['context']} budget {r['budget']} gamma {r['gamma']} ({how}, {r['draft']}): "
        f"acceptance {r['acceptance']:.2f}, plain {r['plain_tokens_per_s']:.1f} tok/s, speculative "
        f"{r['spec_tokens_per_s']:.1f} tok/s, {r['speedup']:.2f}x (predicted {r['predicted_speedup']:.2f}x)"
    )


def spec_table(rows: list[dict]) -> str:
    lines = [
        "| batch | context | budget | draft | gamma | acceptance | plain tok/s | speculative tok/s | speedup "
        "| predicted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gamma = f"{r['gamma']} (cost model)" if r["gamma_from_cost_model"] else str(r["gamma"])
        cells = [r["batch"], r["context"], r["budget"], r.get("draft", "gather"), gamma, f"{r['acceptance']:.2f}"]
        cells += [f"{r['plain_tokens_per_s']:.1f}", f"{r['spec_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x"]
        cells += [f"{r['predicted_speedup']:.2f}x"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def spec_plot(rows: list[dict], path: str) -> None:
    """Measured speedup against batch size, one line per (context, budget), best fixed gamma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for context, budget in sorted({(r["context"], r["budget"]) for r in rows}):
        best: dict[int, float] = {}
        for r in rows:
            if (r["context"], r["budget"]) == (context, budget) and not r["gamma_from_cost_model"]:
                best[r["batch"]] = max(best.get(r["batch"], 0.0), r["speedup"])
        ax.plot(*zip(*sorted(best.items())), marker="o", label=f"context {context}, budget {budget}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speculative / plain decode tokens/s")
    ax.set_title(
        f"{rows[0].get('model', DEFAULT_MODEL) if rows else DEFAULT_MODEL} self-speculation (best gamma), same run"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_spec(args: argparse.Namespace) -> list[dict]:
    """Each (batch, context) in its own process."""
    rows = []
    for context in args.context or SPEC_SUITE["context"]:
        for batch in args.batch or SPEC_SUITE["batch"]:
            shape = {
                "model": args.model,
                "batch": batch,
                "context": context,
                "new_tokens": args.new_tokens or 64,
                "gamma": args.gamma or SPEC_SUITE["gamma"],
                "budget": args.budget or SPEC_SUITE["budget"],
                "draft": args.draft,
            }
            command = [sys.executable, "-m", "jaxdecode.bench", "--spec-child", json.dumps(shape)]
            done = subprocess.run([*command, "--runs", str(args.runs)], capture_output=True, text=True)
            if done.returncode != 0:
                last_line = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
                raise RuntimeError(f"spec batch {batch} context {context} failed: {last_line}")
            for line in done.stderr.splitlines():
                if line.startswith("batch "):
                    print(line, file=sys.stderr, flush=True)
            rows += json.loads(done.stdout.strip().splitlines()[-1])
    return rows


# ------------------------------------------------------------------------------------------------
# The flash suite (LLM in a flash, `flash.py`): one flash checkpoint run by each strategy in its own process.

FLASH_STRATEGIES = ("resident", "naive", "mmap", "oracle", "flash")
FLASH_PPL_OFFSET = 16384  # perplexity on pydoc tokens after the ones the predictors were trained on (the first 8192)


def _flash_dir(args: argparse.Namespace) -> str:
    """The flash checkpoint the suite runs: `--flash-dir`, converted from `--model` and its predictors
    trained (defaults of `jaxdecode train-predictors`, on the pydoc text) when missing."""
    from pathlib import Path

    import jaxdecode as jd

    from . import checkpoint, flash, predictors

    directory = Path(args.flash_dir or Path.home() / ".cache" / "jaxdecode" / "flash" / Path(str(args.model)).stem)
    if not checkpoint.is_checkpoint(directory):
        print(f"converting {args.model} into the flash checkpoint {directory}", file=sys.stderr)
        jd.save(jd.load(args.model), directory, flash=True)
    version = checkpoint.version_dir(directory)
    if not flash.is_flash(version):
        raise ValueError(f"{directory} is a checkpoint but not a flash one: give --flash-dir a new directory")
    if not (version / flash.FLASH / flash.PREDICTORS).is_file():
        print(f"training predictors for {directory} (rank 128, fraction 0.3)", file=sys.stderr)
        model = jd.load(directory)
        layers, report = predictors.train(model, prompt_ids(predictors.Training().max_tokens, args.model))
        predictors.save(directory, layers, report)
    return str(directory)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


class _RssPeak:
    """The process's largest resident set (MB) while the block runs, sampled every 5 ms (Linux)."""

    def __enter__(self):
        import threading

        self.peak, self.stop = _rss_mb(), threading.Event()

        def sample():
            while not self.stop.wait(0.005):
                self.peak = max(self.peak, _rss_mb())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, _rss_mb())


def flash_child(spec: dict, runs: int) -> dict:
    """One strategy: load, one warm-up generation, `runs` timed ones (the resident set sampled while they
    run), then perplexity (its batched forward needs far more activations than decoding: measured after)."""
    import jax

    import jaxdecode as jd

    from .engine import bucket

    jax.devices()
    baseline = _rss_mb()  # Python, JAX and XLA's runtime before any weight is read
    strategy = spec["strategy"]
    offload = None
    if strategy != "resident":
        reads = {"naive": "matrices", "mmap": "mmap"}.get(strategy, "neurons")
        predictor = "oracle" if strategy == "oracle" else "trained"
        offload = jd.Offload(spec["budget_mb"], predictor=predictor, fraction=spec["fraction"], reads=reads)
    model = jd.load(spec["directory"], offload=offload)
    prompt = [prompt_ids(spec["prompt"], spec["model"])]
    jd.generate(model, prompt, max_new_tokens=spec["new_tokens"], stop_ids=())
    with _RssPeak() as decoding:
        results = [jd.generate(model, prompt, max_new_tokens=spec["new_tokens"], stop_ids=()) for _ in range(runs)]
    ids = prompt_ids(FLASH_PPL_OFFSET + spec["ppl_tokens"], spec["model"])[FLASH_PPL_OFFSET:]
    ppl, _ = jd.perplexity(model, ids, window=spec["ppl_window"])
    c = model.config
    slots = bucket(spec["prompt"], c.max_seq_len) + bucket(spec["new_tokens"], c.max_seq_len)
    middle = sorted(results, key=lambda r: r.decode_tokens_per_s)[len(results) // 2]
    stats = middle.offload or {"bytes_read_per_token": 0.0, "ffn_fraction_read": 0.0, "hit_rate": 1.0}
    keep = ("bytes_read_per_token", "ffn_fraction_read", "hit_rate", "io_s", "compute_s", "resident_mb", "cache_mb")
    return {
        **spec,
        "decode_tokens_per_s": middle.decode_tokens_per_s,
        "decode_s": middle.decode_s,
        "perplexity": ppl,
        **{k: stats[k] for k in keep if k in stats},
        "read_mode": stats.get("read_mode", "resident"),
        "peak_rss_mb": decoding.peak,  # while decoding
        "baseline_rss_mb": baseline,
        "process_peak_rss_mb": _peak_rss_mb(),  # loading and the perplexity forward included
        "kv_cache_mb": c.kv_values_per_token * 4 * slots / 1e6,
    }


def run_flash(args: argparse.Namespace) -> list[dict]:
    directory = _flash_dir(args)
    budgets = args.budget_mb or [380.0]
    fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else [None]
    rows = []
    for budget in budgets:
        for strategy in FLASH_STRATEGIES:
            if strategy == "resident" and budget != budgets[0]:
                continue
            for fraction in fractions if strategy in ("oracle", "flash") else [None]:
                spec = {"strategy": strategy, "budget_mb": None if strategy == "resident" else budget}
                spec |= {"fraction": fraction, "directory": directory, "model": args.model, "prompt": 128}
                spec |= {"new_tokens": args.new_tokens or 64, "ppl_tokens": args.ppl_tokens, "ppl_window": 512}
                command = [sys.executable, "-m", "jaxdecode.bench", "--flash-child", json.dumps(spec)]
                done = subprocess.run([*command, "--runs", str(args.runs)], capture_output=True, text=True)
                if done.returncode != 0:
                    last_line = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
                    raise RuntimeError(f"flash {strategy} budget {budget} failed: {last_line}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(_flash_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _flash_line(r: dict) -> str:
    budget = "all in RAM" if r["budget_mb"] is None else f"budget {r['budget_mb']:g} MB"
    fraction = "" if r["fraction"] is None else f" fraction {r['fraction']:g}"
    return (
        f"{r['strategy']}{fraction} ({budget}): decode {r['decode_tokens_per_s']:.2f} tok/s, "
        f"read {r['bytes_read_per_token'] / 1e6:.1f} MB/token ({r['ffn_fraction_read']:.1%} of the FFN), "
        f"hit rate {r['hit_rate']:.1%}, perplexity {r['perplexity']:.3f}, peak RSS decoding {r['peak_rss_mb']:.0f} MB "
        f"(runtime before loading {r['baseline_rss_mb']:.0f} MB)"
    )


def flash_table(rows: list[dict]) -> str:
    head = "| strategy | budget MB | fraction | decode tok/s | vs naive | MB read/token | FFN read | perplexity "
    head += "| RSS decoding MB (- runtime) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        naive = next((n for n in rows if n["strategy"] == "naive" and n["budget_mb"] == r["budget_mb"]), None)
        ratio = f"{r['decode_tokens_per_s'] / naive['decode_tokens_per_s']:.2f}x" if naive else ""
        cells = [r["strategy"], "" if r["budget_mb"] is None else f"{r['budget_mb']:g}"]
        cells += ["" if r["fraction"] is None else f"{r['fraction']:g}", f"{r['decode_tokens_per_s']:.2f}", ratio]
        cells += [f"{r['bytes_read_per_token'] / 1e6:.1f}", f"{r['ffn_fraction_read']:.1%}", f"{r['perplexity']:.3f}"]
        rss = f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['baseline_rss_mb']:.0f})"
        lines.append("| " + " | ".join(map(str, [*cells, rss])) + " |")
    return "\n".join(lines)


def flash_plot(rows: list[dict], path: str) -> None:
    """Decode tokens/s and MB read per token against the budget (one line per strategy and fraction), and
    perplexity against the share of the FFN read per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    offloaded = [r for r in rows if r["budget_mb"] is not None]
    labels = dict.fromkeys((r["strategy"], r["fraction"]) for r in offloaded)
    for strategy, fraction in labels:
        mine = sorted(
            (r for r in offloaded if (r["strategy"], r["fraction"]) == (strategy, fraction)),
            key=lambda r: r["budget_mb"],
        )
        name = strategy + ("" if fraction is None else f" {fraction:g}")
        axes[0].plot([r["budget_mb"] for r in mine], [r["decode_tokens_per_s"] for r in mine], marker="o", label=name)
        axes[1].plot(
            [r["budget_mb"] for r in mine], [r["bytes_read_per_token"] / 1e6 for r in mine], marker="o", label=name
        )
    for r in rows:
        if r["strategy"] == "resident":
            axes[0].axhline(r["decode_tokens_per_s"], color="gray", linestyle="--", label="resident (all in RAM)")
            axes[2].axhline(r["perplexity"], color="gray", linestyle="--", label="resident")
    for strategy in ("flash", "oracle"):
        mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["ffn_fraction_read"])
        if mine:
            axes[2].plot(
                [100 * r["ffn_fraction_read"] for r in mine],
                [r["perplexity"] for r in mine],
                marker="o",
                label=strategy,
            )
    axes[0].set(xlabel="memory budget (MB)", ylabel="decode tokens/s", title="speed")
    axes[1].set(xlabel="memory budget (MB)", ylabel="MB read from storage per token", title="reads")
    axes[2].set(xlabel="FFN read per token (%)", ylabel="perplexity (pydoc text)", title="quality")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":  # the per-engine child process
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--spec-child")
    parser.add_argument("--flash-child")
    parser.add_argument("--runs", type=int, default=3)
    child_args = parser.parse_args()
    if child_args.spec_child:
        print(json.dumps(spec_child(json.loads(child_args.spec_child), child_args.runs)))
    elif child_args.flash_child:
        print(json.dumps(flash_child(json.loads(child_args.flash_child), child_args.runs)))
    else:
        print(json.dumps(child(json.loads(child_args.child), child_args.runs)))
