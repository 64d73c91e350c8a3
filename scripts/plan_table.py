"""The README's `jaxdecode plan` table: presets x targets x weight kinds, each row with its command.

    python scripts/plan_table.py --json docs/plan.json            # the table (about 10 minutes on 2 cores)
    python scripts/plan_table.py --part 0/2 --json /tmp/p0.json   # half of the rows, to run two processes side by side
    python scripts/plan_table.py --merge docs/plan.json /tmp/p0.json /tmp/p1.json   # join parts, print the table

int8 rows are planned for one chip only: quantized weights are not tensor-parallel yet, so on a slice
they would run on one chip of it (the same program as the one-chip row).

Compiling a 32-62 layer program for a TPU slice takes 1-4 minutes here (2 cores), so the table compiles
the H100 rows and Llama-3.1-8B's v5e-1 / v5e-4 rows, and estimates the others from shapes (`--analytic`,
which gives params and KV cache exactly but no temporaries); `--compile-all` compiles every row.
"""

from __future__ import annotations

import argparse
import json
import time

from jaxdecode import plan

MODELS = ["llama-3.1-8b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b", "qwen3-8b", "mistral-7b"]
TARGETS = ["v5e-1", "v5e-4", "v5e-8", "v6e-1", "v6e-4", "h100"]
ONE_CHIP = {"v5e-1", "v6e-1", "h100"}
WORKLOAD = dict(batch=8, context=1024, new_tokens=128)


def rows() -> list[tuple[str, str, str | None]]:
    return [
        (model, target, quant)
        for model in MODELS
        for quant in (None, "int8")
        for target in TARGETS
        if quant is None or target in ONE_CHIP
    ]


def compiled_by_default(model: str, target: str, quant: str | None) -> bool:
    return target == "h100" or (model == "llama-3.1-8b" and quant is None and target in ("v5e-1", "v5e-4"))


def command(model: str, target: str, quant: str | None, compile: bool) -> str:
    w = WORKLOAD
    text = f"jaxdecode plan --model {model} --target {target} --batch {w['batch']} --context {w['context']}"
    return (
        text
        + f" --new-tokens {w['new_tokens']}"
        + (f" --quant {quant}" if quant else "")
        + ("" if compile else " --analytic")
    )


def run(part: int, parts: int, compile_all: bool) -> list[dict]:
    out = []
    for i, (model, target, quant) in enumerate(rows()):
        if i % parts != part:
            continue
        start = time.perf_counter()
        workload = plan.Workload(
            batch=WORKLOAD["batch"], prompt_len=WORKLOAD["context"], new_tokens=WORKLOAD["new_tokens"], quant=quant
        )
        compile = compile_all or compiled_by_default(model, target, quant)
        report = plan.plan(plan.load_plan_config(model), target, workload, compile=compile)
        report.update(model=model, command=command(model, target, quant, compile), plan_s=time.perf_counter() - start)
        print(f"{report['command']}: fits={report['fits']} ({report['plan_s']:.0f} s)", flush=True)
        out.append(report)
    return out


def markdown(reports: list[dict]) -> str:
    def gib(n):
        return "-" if n is None else f"{n / 2**30:.1f}"

    lines = [
        "| model | target | weights | mesh | fits | params / KV / temp / peak GiB per chip | compiled "
        "| decode tok/s (roofline) | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {key: i for i, key in enumerate(rows())}
    for r in sorted(reports, key=lambda r: order[(r["model"], r["target"], r["workload"]["quant"])]):
        b, mesh = r["per_device_bytes"], r["mesh"]
        fits = "yes" if r["fits"] else "**no**" + (" (HBM)" if r["compiler_message"] else "")
        fits += "" if r["compiled"] else "*"  # params + KV cache only: no temporaries without the compiler
        sizes = " / ".join(gib(b[k]) for k in ("params", "kv_cache", "temp", "peak"))
        speed = f"{r['decode_tokens_per_s']:.0f}" if r["fits"] else "-"
        weights = r["workload"]["quant"] or "bf16"
        lines.append(
            f"| {r['model']} | {r['target']} | {weights} | {mesh['data']}x{mesh['model']} | {fits} | {sizes} "
            f"| {'yes' if r['compiled'] else 'no'} | {speed} | `{r['command']}` |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="0/1", help="I/N: the I-th of N interleaved shares of the rows")
    parser.add_argument("--json", help="write the reports here")
    parser.add_argument("--merge", nargs="+", help="OUT IN...: join part files into OUT and print the table")
    parser.add_argument("--compile-all", action="store_true", help="compile every row (hours on 2 cores)")
    args = parser.parse_args()
    if args.merge:
        reports = [r for path in args.merge[1:] for r in json.load(open(path))]
        with open(args.merge[0], "w") as f:
            json.dump(reports, f, indent=1)
    else:
        part, parts = (int(x) for x in args.part.split("/"))
        reports = run(part, parts, args.compile_all)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(reports, f, indent=1)
    print(markdown(reports))


if __name__ == "__main__":
    main()
