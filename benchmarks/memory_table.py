"""What fits where: Llama-2-7B and 13B on machines users rent, decided by each machine's own compiler.

    python benchmarks/memory_table.py --data alpaca_data.json   # tens of minutes on 2 CPU cores, cached

For each row it runs the planner (memory_plan.plan_run, what `memory_plan.py --target NAME` prints) at
alpaca.py's default flags, or the row's: the TPU compiler (libtpu) or the CUDA one (JAX's CUDA plugin,
without a GPU) compiles the real train step for that machine's devices and reports what one device holds;
where that does not fit there, the planner's fixes follow, each accepted by the same compiler. A machine
whose compiler is not installed here gets XLA:CPU's estimate for as many virtual devices instead, and says
so. Only config.json is needed (the public Llama-2 shapes, written to a temporary directory) and the LLaMA
tokenizer in tests/assets; no weights. The data: --data (Stanford's alpaca_data.json, whose plan the table
shows), by default the 2,000-record sample in tests/assets (it says which). Compiles are cached in
--cache_dir, so a rerun is quick. Prints one JSON line per row, then a Markdown table.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import alpaca  # noqa: E402
import memory_plan  # noqa: E402
from bench import CONFIGS, SAMPLE, TOKENIZER  # noqa: E402

# model, --target, flags other than the defaults. The tutorial's pod job is v3-32 at --seq_len 512; the
# v3-8 flags are those an XLA:CPU estimate once recommended there; LoRA on one 24 GB GPU in 8 passes.
ROWS = [("7B", "v3-8", {}), ("7B", "v3-8", {"seq_len": 1024, "batch_size": 64}),
        ("7B", "v3-32", {"seq_len": 512}), ("7B", "v3-32", {}), ("7B", "v4-8", {}), ("7B", "v5e-8", {}),
        ("7B", "v5p-8", {}), ("7B", "v6e-8", {}), ("7B", "a100-40gb-x8", {}), ("7B", "a100-80gb-x8", {}),
        ("7B", "h100-x8", {}), ("7B", "h200-x1", {}),
        ("7B", "l4-x1", {"lora_rank": 8, "micro_batch_size": 1}),
        ("13B", "v3-32", {}), ("13B", "v5p-8", {}), ("13B", "a100-80gb-x8", {}), ("13B", "h200-x1", {})]


def write_config(directory, size):
    """The public shapes of meta-llama/Llama-2-{7b,13b}-hf (bench.CONFIGS) as a config.json."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(CONFIGS[f"llama2-{size.lower()}"].to_hf(), fh)


def plan_row(c, name):
    """The planner's (data statistics, plan) on --target `name`, or, where that machine's compiler is not
    installed here, XLA:CPU's estimate for as many devices of what one of them offers."""
    try:
        return memory_plan.plan_run(c, name)
    except memory_plan.CompilerMissing:
        t = memory_plan.target(name)
        gb = c.device_memory_gb or memory_plan.device_memory(t) / 1e9
        return memory_plan.plan_run(dataclasses.replace(c, data_parallel=t.devices, device_memory_gb=gb))


def fix_text(fix):
    gb = f"{fix['total'] / 1e9:.1f} GB"
    flags = {k: v for k, v in fix["changes"].items() if k != "data_parallel"}
    if "data_parallel" in fix["changes"]:  # the estimate's bigger machine: the same flags on more devices
        return f"{fix['devices']} such devices ({gb})"
    return f"`{' '.join(f'--{k} {v}' for k, v in flags.items())}` ({gb})"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="7B,13B")
    p.add_argument("--machines", default=",".join(dict.fromkeys(r[1] for r in ROWS)),
                   help="--target names (memory_plan.py --help lists them)")
    p.add_argument("--cache_dir", default=os.path.join(ROOT, ".cache"))
    p.add_argument("--data", default=SAMPLE,
                   help="Alpaca records (Stanford's alpaca_data.json for the real plan); default: the "
                        "2,000-record sample in tests/assets")
    args = p.parse_args()
    print(f"data: {args.data}" + (" (the 2,000-record sample: pass --data alpaca_data.json for all of Alpaca)"
                                  if args.data == SAMPLE else ""), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, name, flags in ROWS:
            if size not in args.models.split(",") or name not in args.machines.split(","):
                continue
            model = os.path.join(tmp, f"Llama-2-{size}")
            write_config(model, size)
            c = alpaca.Config(model=model, tokenizer=TOKENIZER, data=args.data, cache_dir=args.cache_dir,
                              **flags)
            t0 = time.time()
            info, plan = plan_row(c, name)
            rec = {"model": f"Llama-2-{size}", "target": name,
                   "flags": " ".join(f"--{k} {v}" for k, v in flags.items()), "devices": plan["devices"],
                   "rows": plan["rows"], "seq_len": plan["seq_len"], "micro_batches": plan["micro_batches"],
                   "per_device_gb": round(plan["total"] / 1e9, 2), "refused": plan.get("refused"),
                   "device_gb": round(plan["device_memory_bytes"] / 1e9, 2), "fits": plan["fits"],
                   "fits_at_mem_fraction_0.95": plan.get("fits_at_mem_fraction_0.95"),
                   "compiler": plan["compiler"], "fixes": [fix_text(f) for f in plan.get("fixes", [])],
                   "seconds": round(time.time() - t0, 1)}
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    print("\n| model | machine | rows x tokens | per device (compiler) | usable | fits "
          "| flags that make it fit |")
    print("|---|---|---|---:|---:|---|---|")
    for r in rows:
        fixes = "; ".join(r["fixes"]) or ("" if r["fits"] else "none tried fits")
        fits = "yes" if r["fits"] else "no" + (", yes at 0.95" if r["fits_at_mem_fraction_0.95"] else "")
        figure = "refused" if r["refused"] else f"{r['per_device_gb']:.2f} GB"  # the compiler's verdict
        compiler = r["compiler"].split(" (")[0].replace("XLA:CPU estimate", "XLA:CPU, an estimate")
        shape = f"{r['rows']} x {r['seq_len']}" + (f", {r['micro_batches']} passes" if r["micro_batches"] > 1
                                                    else "")
        print(f"| {r['model']} | {r['target']} {r['flags']} | {shape} | {figure} ({compiler}) | "
              f"{r['device_gb']:.2f} GB | {fits} | {fixes} |")


if __name__ == "__main__":
    main()
