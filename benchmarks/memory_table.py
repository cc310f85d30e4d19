"""What fits where: the memory plan of benchmarks/memory_plan.py for Llama-2-7B and 13B on common machines.

    .venv/bin/python benchmarks/memory_table.py --data alpaca_data.json   # 7B and 13B: minutes to an hour

For each model and machine it runs the planner (memory_plan.plan_run, what memory_plan.py prints) at
alpaca.py's default flags with --data_parallel = the machine's jax device count and --device_memory_gb =
one device's HBM: XLA compiles the real train step on that many virtual CPU devices and reports what one
device holds; where that does not fit, the planner's own suggestions follow, each checked by its own
compile. Only config.json is needed (the public Llama-2 shapes, written to a temporary directory) and the
LLaMA tokenizer in tests/assets; no weights. The data: --data (Stanford's alpaca_data.json, whose plan the
table shows), by default the 2,000-record sample in tests/assets (it says which). Compiles are cached in
--cache_dir, so a rerun is quick. Prints one JSON line per machine, then a Markdown table.
"""

import argparse
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

# name, jax devices, device kind (memory_plan.DEVICE_MEMORY_GB): a TPU v3-8 is 4 chips of 2 cores (8 devices
# of 16 GiB), a v4-8 is 4 chips (4 devices of 32 GiB), a v5e-8 8 chips of 16 GiB.
MACHINES = [("TPU v3-8", 8, "TPU v3"), ("TPU v3-32", 32, "TPU v3"), ("TPU v4-8", 4, "TPU v4"),
            ("TPU v5e-8", 8, "TPU v5e"), ("8x A100-40GB", 8, "A100-SXM4-40GB"), ("8x A100-80GB", 8, "A100"),
            ("1x H200", 1, "H200")]


def write_config(directory, size):
    """The public shapes of meta-llama/Llama-2-{7b,13b}-hf (bench.CONFIGS) as a config.json."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(CONFIGS[f"llama2-{size.lower()}"].to_hf(), fh)


def fix_text(fix):
    gb = f"{fix['total'] / 1e9:.1f} GB"
    if "data_parallel" in fix["changes"]:  # the same flags on a bigger machine
        return f"{fix['devices']} such devices ({gb})"
    return f"`{fix['flags']}` ({gb})"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="7B,13B")
    p.add_argument("--machines", default=",".join(m[0] for m in MACHINES))
    p.add_argument("--cache_dir", default=os.path.join(ROOT, ".cache"))
    p.add_argument("--data", default=SAMPLE,
                   help="Alpaca records (Stanford's alpaca_data.json for the real plan); default: the "
                        "2,000-record sample in tests/assets")
    args = p.parse_args()
    data, tokenizer = args.data, TOKENIZER  # the LLaMA tokenizer shipped in tests/assets
    print(f"data: {data}" + (" (the 2,000-record sample: pass --data alpaca_data.json for all of Alpaca)"
                             if data == SAMPLE else ""), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.models.split(","):
            model = os.path.join(tmp, f"Llama-2-{size}")
            write_config(model, size)
            for name, devices, kind in MACHINES:
                if name not in args.machines.split(","):
                    continue
                gb = memory_plan.DEVICE_MEMORY_GB[kind]
                c = alpaca.Config(model=model, tokenizer=tokenizer, data=data, cache_dir=args.cache_dir,
                                  data_parallel=devices, device_memory_gb=gb)
                t0 = time.time()
                info, plan = memory_plan.plan_run(c)
                rec = {"model": f"Llama-2-{size}", "machine": name, "devices": devices, "device_gb": gb,
                       "rows": plan["rows"], "seq_len": plan["seq_len"],
                       "per_device_gb": round(plan["total"] / 1e9, 2),
                       "fits": plan["fits"], "fixes": [fix_text(f) for f in plan.get("fixes", [])],
                       "seconds": round(time.time() - t0, 1)}
                print(json.dumps(rec), flush=True)
                rows.append(rec)
    print("\n| model | machine | devices x GB | per device at the defaults | fits "
          "| flags that make it fit (per device) |")
    print("|---|---|---|---:|---|---|")
    for r in rows:
        fixes = "; ".join(r["fixes"]) or ("" if r["fits"] else "none tried fits")
        print(f"| {r['model']} | {r['machine']} | {r['devices']} x {r['device_gb']:g} | "
              f"{r['per_device_gb']:.1f} GB ({r['rows']} rows x {r['seq_len']}) | "
              f"{'yes' if r['fits'] else 'no'} | {fixes} |")


if __name__ == "__main__":
    main()
