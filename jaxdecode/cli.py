"""Command line: `jaxdecode generate`, `chat`, `convert`, `train-predictors`, `eval-ppl`, `bench`, `plan`
and `doctor`.

Errors a user can fix (bad model name, missing file, bad settings) end with one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def _cache_dir() -> Path:
    root = os.environ.get("JAXDECODE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxdecode"
    )
    return Path(root) / "xla"


def _enable_compilation_cache() -> None:
    """JAX's persistent compilation cache: a second run of the same shapes skips XLA compilation."""
    import jax

    try:
        _cache_dir().mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # an unwritable cache directory only costs compile time
    jax.config.update("jax_compilation_cache_dir", str(_cache_dir()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", default=None, help="weights: int8, int4 (group-wise) or native (a GGUF's own blocks)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64 or 128")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="embedded name (smollm2-135m, gemma3-270m), .gguf file, HF directory, checkpoint or hub id (org/name)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--attention",
        default="auto",
        help="attention kernels: auto (Pallas on TPU/GPU, XLA on CPU), xla, pallas, interpret (slow, CPU check)",
    )
    _add_quant_args(p)
    p.add_argument(
        "--offload-mb",
        type=float,
        default=None,
        help="a flash checkpoint (convert --flash) run in this many MB of weights: MLP neurons read from storage",
    )
    p.add_argument("--predictor", default="trained", choices=["trained", "oracle"], help="with --offload-mb")
    p.add_argument("--fraction", type=float, default=None, help="with --offload-mb: share of neurons per token")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_load_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdecode", description="Fast LLM inference in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and speeds")
    gen.add_argument(
        "--speculative", choices=["self", "draft"], help="self: MagicDec self-speculation; draft: --draft-model drafts"
    )
    gen.add_argument("--draft-model", help="the draft for --speculative draft (same tokenizer, smaller)")
    gen.add_argument("--gamma", type=int, help="tokens drafted per round (default: the cost model's; 4 for a draft)")
    gen.add_argument("--budget", type=int, default=512, help="self-speculation: KV entries the draft reads")
    gen.add_argument("--sinks", type=int, default=16, help="self-speculation: first entries always read")
    _add_model_args(gen)
    chat = sub.add_parser("chat", help="an interactive chat with the model's chat template")
    chat.add_argument("--system", default=None, help="a system message")
    _add_model_args(chat)
    convert = sub.add_parser("convert", help="save a model (optionally quantized) as a jaxdecode Orbax checkpoint")
    convert.add_argument(
        "source",
        help="embedded name (smollm2-135m, gemma3-270m), .gguf file, HF directory, checkpoint or hub id (org/name)",
    )
    convert.add_argument("destination", help="checkpoint directory (an existing checkpoint is replaced safely)")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _add_quant_args(convert)
    convert.add_argument(
        "--flash",
        action="store_true",
        help="MLP weights in per-neuron bundle files (float32, or int8 with --quant int8), for load(..., offload=)",
    )
    train = sub.add_parser(
        "train-predictors", help="train a flash checkpoint's activity predictors on a text (LLM in a flash)"
    )
    train.add_argument("checkpoint", help="a flash checkpoint (jaxdecode convert SRC DST --flash)")
    train.add_argument("--text-file", required=True)
    train.add_argument("--rank", type=int, default=128)
    train.add_argument("--fraction", type=float, default=0.3, help="share of neurons active per token")
    train.add_argument("--steps", type=int, default=400)
    train.add_argument("--max-tokens", type=int, default=8192, help="tokens of the text recorded (10%% held out)")
    ppl = sub.add_parser("eval-ppl", help="perplexity of a text file in non-overlapping windows (no BOS)")
    ppl.add_argument("--text-file", required=True)
    ppl.add_argument("--max-tokens", type=int, default=None, help="score the first N tokens (default: all)")
    ppl.add_argument("--window", type=int, default=1024)
    ppl.add_argument("--json", action="store_true", help='print {"perplexity": ..., "tokens": ...}')
    _add_load_args(ppl)
    plan = sub.add_parser(
        "plan", help="will a model fit a TPU / GPU target, and how fast can it decode there (compiled, no weights)"
    )
    plan.add_argument(
        "--model", required=True, help="a preset (llama-3.1-8b, ...), a config.json directory, or any --model"
    )
    plan.add_argument("--target", required=True, help="v5e-1, v5e-4, v5e-8, v6e-1, v6e-4, v6e-8, v5p-8, h100, a100, l4")
    plan.add_argument("--mesh", help="DATAxMODEL, e.g. 1x4 (default: the smallest model axis that fits)")
    plan.add_argument("--batch", type=int, default=8)
    plan.add_argument("--context", type=int, default=1024, help="prompt tokens per row")
    plan.add_argument("--new-tokens", type=int, default=128)
    plan.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    plan.add_argument("--quant", choices=["int8", "int4"], default=None)
    plan.add_argument("--analytic", action="store_true", help="estimate from shapes instead of compiling")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    doctor = sub.add_parser(
        "doctor", help="versions, devices, the attention backend auto picks, and every kernel checked against XLA"
    )
    doctor.add_argument("--runs", type=int, default=None, help="timed calls per kernel (default 20; 1 on CPU)")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    bench = sub.add_parser(
        "bench", help="benchmark jaxdecode against HF transformers and llama.cpp on the embedded model"
    )
    from . import bench as bench_module

    bench_module.add_arguments(bench)
    return parser


def _sampling(args: argparse.Namespace):
    import jaxdecode as jd

    return jd.Sampling(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )


def _load(args: argparse.Namespace):
    import jaxdecode as jd

    offload = None
    if args.offload_mb is not None:
        offload = jd.Offload(args.offload_mb, predictor=args.predictor, fraction=args.fraction)
    return jd.load(
        args.model,
        dtype=args.dtype,
        attention=args.attention,
        quant=args.quant,
        group_size=args.group_size,
        offload=offload,
    )


def _read_text(name: str) -> str:
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def _train_predictors(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    import jaxdecode as jd
    from jaxdecode import predictors

    settings = predictors.Training(rank=args.rank, fraction=args.fraction, steps=args.steps, max_tokens=args.max_tokens)
    text = _read_text(args.text_file)
    if not jd.flash.is_flash(jd.checkpoint.version_dir(args.checkpoint)):
        raise ValueError(f"{args.checkpoint} is not a flash checkpoint: convert it with --flash first")
    model = jd.load(args.checkpoint)
    ids = model.require_tokenizer().encode(text)
    if len(ids) < settings.max_tokens:
        raise ValueError(f"{args.text_file} has {len(ids)} tokens, fewer than --max-tokens {settings.max_tokens}")
    with tqdm(total=settings.steps, desc="train predictors", unit="step", file=sys.stderr) as bar:

        def progress(step: int, loss: float) -> None:
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")

        layers, report = predictors.train(model, ids, settings, progress)
    predictors.save(args.checkpoint, layers, report)
    print(
        f"held-out tokens: {report['held_out_tokens']}; per layer (fraction {settings.fraction}, rank {settings.rank}):"
    )
    for i, (p, r) in enumerate(zip(report["precision"], report["recall"])):
        print(f"  layer {i:3d}  precision {p:.3f}  recall {r:.3f}")
    print(f"saved the predictors into {args.checkpoint}", file=sys.stderr)


def _convert(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    import jaxdecode as jd

    jd.quantize.check_choice(args.quant, args.group_size)  # fail before the slow part
    if args.flash and (args.quant not in (None, "int8") or args.dtype != "float32"):
        raise ValueError("--flash writes float32 or int8 bundles: use --dtype float32, with --quant int8 or none")
    jd.checkpoint.check_destination(Path(args.destination).absolute())
    with tqdm(total=2, desc=f"convert {args.source}", unit="step", file=sys.stderr) as bar:
        bar.set_postfix_str("reading" + (f" and quantizing ({args.quant})" if args.quant else ""))
        model = jd.load(args.source, dtype=args.dtype, quant=args.quant, group_size=args.group_size)
        bar.update()
        bar.set_postfix_str(f"writing {args.destination}")
        jd.save(model, args.destination, flash=args.flash)
        bar.update()
    size = jd.quantize.param_bytes(model.params)
    print(f"saved {args.destination} ({size / 1e6:.1f} MB of parameters)", file=sys.stderr)


def _eval_ppl(args: argparse.Namespace) -> None:
    import jaxdecode as jd

    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    path, text = Path(args.text_file), _read_text(args.text_file)
    model = _load(args)
    ids = model.require_tokenizer().encode(text)
    if args.max_tokens is not None:
        if len(ids) < args.max_tokens:
            raise ValueError(f"{path} has only {len(ids)} tokens, fewer than --max-tokens {args.max_tokens}")
        ids = ids[: args.max_tokens]
    value, count = jd.perplexity(model, ids, window=args.window)
    if args.json:
        print(json.dumps({"perplexity": value, "tokens": count}))
    else:
        print(f"perplexity {value:.4f} over {count} scored tokens (windows of {args.window}, {args.model})")


def _speculative(args: argparse.Namespace):
    """The `speculative=` setting from the command line (None without --speculative; a draft model is
    loaded here)."""
    import jaxdecode as jd

    if args.speculative is None:
        if args.draft_model:
            raise ValueError("--draft-model needs --speculative draft")
        return None
    if args.speculative == "self":
        return jd.SelfSpeculative(budget=args.budget, sinks=args.sinks, gamma=args.gamma)
    if not args.draft_model:
        raise ValueError("--speculative draft needs --draft-model (a smaller model with the same tokenizer)")
    draft = jd.load(args.draft_model, dtype=args.dtype, attention=args.attention)
    return jd.DraftModel(draft, gamma=args.gamma or 4)


def _generate(args: argparse.Namespace) -> None:
    import jaxdecode as jd

    sampling = _sampling(args)  # validate settings before the slow load
    speculative = _speculative(args)
    model = _load(args)
    prompt = args.prompt
    if args.chat:
        prompt = model.require_tokenizer().apply_chat_template([{"role": "user", "content": prompt}])
    request = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed, speculative=speculative)
    if args.json:
        out = jd.generate(model, prompt, **request)
        record = {
            "prompt_tokens": out.prompt_tokens[0],
            "tokens": out.tokens[0],
            "text": out.text[0],
            "finish_reason": out.finish_reasons[0],
            "prefill_tokens_per_s": out.prefill_tokens_per_s,
            "decode_tokens_per_s": out.decode_tokens_per_s,
            "compile_s": out.compile_s,
            "speculation": out.speculation,
            "offload": out.offload,
        }
        print(json.dumps(record))
        return
    for piece in jd.stream(model, prompt, **request):  # speculative: each round's accepted tokens as it ends
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _chat(args: argparse.Namespace) -> None:
    import jaxdecode as jd

    sampling = _sampling(args)
    model = _load(args)
    tokenizer = model.require_tokenizer()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with", args.model, "- an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(messages)
        reply = []
        pieces = jd.stream(model, prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
        for piece in pieces:
            reply.append(piece.text)
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _plan(args: argparse.Namespace) -> None:
    from . import plan, targets

    target = targets.get(args.target)
    mesh = None
    if args.mesh is not None:
        data, _, model = args.mesh.lower().partition("x")
        if not (data.isdigit() and model.isdigit()) or int(data) < 1 or int(model) < 1:
            raise ValueError(f"--mesh must be DATAxMODEL with positive integers, e.g. 1x4; got {args.mesh!r}")
        mesh = (int(data), int(model))
    for name in ("batch", "context", "new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    workload = plan.Workload(
        batch=args.batch, prompt_len=args.context, new_tokens=args.new_tokens, dtype=args.dtype, quant=args.quant
    )
    config = plan.load_plan_config(args.model)
    report = plan.plan(config, target, workload, mesh=mesh, compile=False if args.analytic else None)
    print(json.dumps(report) if args.json else plan.format_report(report))


def _doctor(args: argparse.Namespace) -> None:
    from . import doctor

    if args.runs is not None and args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    data = doctor.report(args.runs)
    print(json.dumps(data) if args.json else doctor.format_report(data))
    failed = [c for c in data["checks"] if "error" in c]
    if failed:
        print(f"jaxdecode doctor: {len(failed)} kernel check(s) failed (see above)", file=sys.stderr)
        raise SystemExit(EXIT_INTERNAL)


def _bench(args: argparse.Namespace) -> None:
    from . import bench

    bench.run(args)


EXIT_INTERNAL = 1
DEBUG_ENV = "JAXDECODE_DEBUG"


def main(argv: list[str] | None = None) -> int:
    """Run one command. A bad input (model file, argument, path) prints one line and exits 2; an internal
    error prints one line saying so (the traceback with `--debug` or JAXDECODE_DEBUG=1) and exits 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        if args.command != "plan":  # plan's compile-only TPU / GPU executables cannot be read back from a cache
            _enable_compilation_cache()
        commands = {
            "generate": _generate,
            "chat": _chat,
            "convert": _convert,
            "eval-ppl": _eval_ppl,
            "train-predictors": _train_predictors,
            "bench": _bench,
            "plan": _plan,
            "doctor": _doctor,
        }
        commands[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        if debug:
            raise
        print(f"jaxdecode: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - the CLI never shows a traceback unless asked to
        if debug:
            raise
        print(
            f"jaxdecode: internal error: {type(e).__name__}: {_one_line(e)} "
            f"(this is a bug; rerun with --debug or {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return 0


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 2000 else text[:2000] + "..."


if __name__ == "__main__":
    sys.exit(main())
