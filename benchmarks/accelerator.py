"""How close the train step comes to the accelerator's limit, what memory it takes, and whether the full
Llama-2-7B step fits on ONE device: one command, on whatever jax backend it finds.

    python benchmarks/accelerator.py            # ~1B and Llama-2-7B shapes: about 8 minutes on one H200
    python benchmarks/accelerator.py --small    # tiny stand-ins, a few steps: a minute or two on 2 CPU cores

Parts, each in a process of its own (run by this one): a part that runs out of memory, crashes or overruns
its time share then costs only itself, every part starts with the whole device to itself, and the memory
peak it reports is its own. Each prints JSON lines; this process prints them as they come, then a table.
  peak      the matmul peak of one device in the compute dtype (bench.matmul_peak: 8192^3 off CPU, median
            of 5), measured first and last (the better one is "measured" below), and the datasheet peak
            (alpaca.PEAK_TFLOPS: 989 TFLOP/s bf16 for an H100 or H200).
  packed    sharding.make_train_step (AdamW included, bf16 compute off CPU, float32 master weights) on the
            ~1B config (TinyLlama-1.1B shapes: D 2048, 22 layers, F 5632, 32 query and 4 kv heads,
            V 32000), Stanford's 128 examples a step packed in rows of 2048, with remat on and with remat off.
  no_pack   the same examples, one a row, padded to 512 (what --no_pack does at --seq_len 512).
  hf        transformers' LlamaForCausalLM + torch AdamW, Stanford's collator (pad to the longest of 4),
            bf16 autocast on a CUDA GPU, on the same examples (when torch and transformers import). jax
            only sees the CPU in that process, so torch has the device to itself.
  7b        Llama-2-7B shapes on one device: float32 parameters and AdamW state, 128 examples a step packed
            in rows of 2048. The step is compiled before anything is allocated, and the memory that XLA
            says it needs (compiled.memory_analysis()) is compared with the device's (memory_stats()
            bytes_limit): if it fits, parameters are made at random straight on the device and a few steps
            run (an out-of-memory error is caught and reported), and the 1218-step recipe is projected from
            the measured s/step and the packing plan. If not: one row per micro-batch, then the most layers
            that fit (from the memory of one layer), and by how much the full step misses.
Rates, FLOPs and MFU are benchmarks/bench.py's (which this reuses): useful FLOPs (llama.train_flops) over
time, against the measured and the datasheet peak. Example lengths: --data (Stanford's alpaca_data.json),
by default the 2,000-record sample in tests/assets (it says which).
--small swaps both configs for the tiny one (stories260K's shape), 16 examples a step in rows of 256 and 2
timed steps, so that the whole path runs on a CPU in a minute or two (tests/test_benchmarks.py runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time

# jax takes 75% of a GPU's memory by default; the 7B step needs nearly all of it. Set before jax is
# imported, unless the caller chose a fraction under either name (XLA_CLIENT_MEM_FRACTION is the newer
# one; both at once is an error for jax's CUDA plugin, hence never add one next to the other).
if not any(v in os.environ for v in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")):
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.95"

import bench  # noqa: E402  (benchmarks/bench.py: puts the repository on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import alpaca  # noqa: E402
import sharding  # noqa: E402

emit = bench.emit
RECORDS = 52_002  # Stanford Alpaca's, for the projection when only the sample is loaded
RECIPE_EPOCHS = 3

# Each part's share of the default --budget_s, in seconds (scaled with it); a part may also use what the
# ones before it left. In order of importance: what a run cut short still has.
PARTS = [("peak", 30), ("packed", 75), ("7b", 180), ("hf", 60), ("no_pack", 50), ("packed_no_remat", 60),
         ("peak_end", 25)]


T0 = time.time()


def say(msg):  # progress, on stderr: stdout holds the JSON lines and the table
    print(f"[accelerator {time.time() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def settings(args):
    """(the ~1B config, the 7B config, examples a step, packed row length, --no_pack padding length =
    the longest example kept)"""
    if args.small:  # short rows compile faster on a CPU
        return bench.CONFIGS["tiny"], bench.CONFIGS["tiny"], 16, 256, 256
    return bench.CONFIGS["1b"], bench.CONFIGS["llama2-7b"], 128, 2048, 512


# ---------------------------------------------------------------------------------------------------------
# The parts (each runs in its own process)


def part_peak(args, examples, info):
    dev = jax.devices()[0]
    versions = {}
    for pkg in ("jax", "jaxlib", "torch", "transformers"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    if args.part == "peak":
        emit({"env": True, "backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
              "devices": jax.device_count(),
              "device_memory_bytes": (dev.memory_stats() or {}).get("bytes_limit"),
              "compute_dtype": args.compute_dtype, "date": datetime.date.today().isoformat(),
              "machine": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
              "versions": versions, "examples": info})
    emit({"peak": args.part, "dtype": args.compute_dtype,
          "measured_tflops": bench.matmul_peak(jnp.dtype(args.compute_dtype)) / 1e12,
          "datasheet_tflops": (bench.datasheet_peak(args.compute_dtype) or 0) / 1e12 or None})


def out_of_memory(e):
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def attempt(name, mode, mc, examples, plan, args, mesh, limit, micro_batches=1):
    """Compile the step; run it when XLA's figure of its memory is within `limit` (bytes; None: unknown).
    One record either way, with "fits": True / False and, when it does not, why."""
    n = mesh.shape[sharding.FSDP] * micro_batches
    if plan["rows_per_step"] % n:
        return emit({"config": name, "mode": mode, "skipped": f"{plan['rows_per_step']} rows do not split "
                                                               f"into {n} devices x micro-batches"})
    say(f"{name} {mode}: compiling ({mc.num_hidden_layers} layers, {micro_batches} micro-batches)")
    compiled = bench.compile_jax(mc, examples, plan, args, mesh, micro_batches)
    need = compiled[3]
    base = {"config": name, "mode": mode, "layers": mc.num_hidden_layers, "micro_batches": micro_batches,
            "step_memory_bytes": need, "memory_limit_bytes": limit, "compile_s": round(compiled[2], 2)}
    if limit and need and need > limit:
        why = (f"the compiled step needs {gb(need)} GB, {gb(need - limit)} GB more than the device's "
               f"{gb(limit)} GB")
        return emit({**base, "fits": False, "why": why})
    say(f"{name} {mode}: compiled in {compiled[2]:.1f} s, needs {gb(need)} GB; running")
    try:
        rec = bench.run_jax(name, mode, mc, examples, plan, args, args.peaks, mesh, *compiled,
                            micro_batches=micro_batches)
    except Exception as e:  # noqa: BLE001  (jax's XlaRuntimeError is not public API)
        if not out_of_memory(e):
            raise
        return emit({**base, "fits": False, "why": "out of memory when run: " + str(e).splitlines()[0][:300]})
    return emit({**base, **rec, "fits": True})


def device_limit(args, mesh):
    if args.memory_limit_gb:
        return int(args.memory_limit_gb * 1e9)
    return (mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit")  # None on CPU


def part_7b(args, examples, mc):
    """The full config on one device with the recipe's batch, in one micro-batch or, if that does not fit,
    one row per micro-batch; if neither fits, the most layers that do."""
    name = "7b" if not args.small else "7b-standin"
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    limit = device_limit(args, mesh)
    _, _, batch, seq_len, _ = settings(args)
    plan, _ = bench.step_plans(examples, batch_size=batch, seq_len=seq_len, steps=args.warmup + args.steps)
    L, R = mc.num_hidden_layers, plan["rows_per_step"]
    tries = [attempt(name, "one device", mc, examples, plan, args, mesh, limit)]

    def time_for_another():  # a compile like the first, its steps and a margin, before the part's deadline
        return time.time() + 1.5 * tries[0]["compile_s"] + 20 < args.deadline

    if not tries[0].get("fits") and R > 1 and time_for_another():
        tries.append(attempt(name, "one device", mc, examples, plan, args, mesh, limit, micro_batches=R))
    # The one that fits, else the smaller.
    full = min(tries, key=lambda r: (not r.get("fits"), r.get("step_memory_bytes") or 0))
    best = full
    if not full.get("fits") and full.get("step_memory_bytes") and limit and L > 1:
        # Memory is (nearly) linear in the layer count: one layer's bytes from the compiled 1-layer step.
        M = full["micro_batches"]
        one = bench.compile_jax(dataclasses.replace(mc, num_hidden_layers=1), examples, plan, args, mesh,
                                M)[3]
        per_layer = (full["step_memory_bytes"] - one) / (L - 1)
        layers = min(L - 1, int((limit - one) // per_layer) + 1)
        for _ in range(3):  # a run that still runs out of memory tries one layer fewer
            if layers < 1 or not time_for_another():
                break
            best = attempt(name, "one device", dataclasses.replace(mc, num_hidden_layers=layers), examples,
                           plan, args, mesh, limit, micro_batches=M)
            if best.get("fits"):
                break
            layers -= 1
    need = full.get("step_memory_bytes")
    summary = {"fit_on_one_device": name, "layers": L, "full_fits": bool(full.get("fits")),
               "full_micro_batches": full.get("micro_batches"), "full_step_memory_bytes": need,
               "memory_limit_bytes": limit,
               "full_misses_by_bytes": need - limit if limit and need and need > limit else None,
               "largest_fit": {k: best.get(k) for k in ("layers", "micro_batches", "step_memory_bytes",
                                                        "s_per_step")} if best.get("fits") else None}
    if full.get("fits"):
        # The recipe's steps from the packing plan of its 3 epochs (scaled to the 52,002 records when only
        # the sample is loaded), at the measured seconds per step.
        lengths = alpaca.example_lengths(examples)
        epochs = alpaca.plan_steps(lengths, seed=0, rows_per_step=R, seq_len=seq_len, epochs=RECIPE_EPOCHS)
        steps = math.ceil(epochs["steps"] * RECORDS / len(lengths))
        summary.update({"recipe_steps": steps, "s_per_step": full["s_per_step"],
                        "projected_hours": round(steps * full["s_per_step"] / 3600, 2)})
    emit(summary)


def run_part(args):
    one_b, seven_b, batch, seq_len, pad_len = settings(args)
    examples, info = bench.load_examples(args.data, args.cache_dir, max_len=pad_len)
    name = "1b" if not args.small else "tiny"
    if args.part in ("peak", "peak_end"):
        return part_peak(args, examples, info)
    if args.part == "7b":
        return part_7b(args, examples, seven_b)
    steps = args.warmup + args.steps
    mesh = sharding.make_mesh()
    n = mesh.shape[sharding.FSDP]
    packed, _ = bench.step_plans(examples, batch_size=batch, seq_len=seq_len, steps=steps, data_parallel=n)
    _, padded = bench.step_plans(examples, batch_size=batch, seq_len=pad_len, steps=steps)
    if args.part == "packed":
        attempt(name, "packed, remat on", one_b, examples, packed, args, mesh, device_limit(args, mesh))
    elif args.part == "packed_no_remat":
        args.remat = "off"
        attempt(name, "packed, remat off", one_b, examples, packed, args, mesh, device_limit(args, mesh))
    elif args.part == "no_pack":
        attempt(name, f"no_pack (pad {pad_len})", one_b, examples, padded, args, mesh,
                device_limit(args, mesh))
    elif args.part == "hf":
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            return emit({"config": name, "mode": "hf_torch", "skipped": "torch/transformers not installed"})
        say(f"{name} hf_torch: running")
        bench.time_hf(name, one_b, examples, padded, args, args.peaks)


# ---------------------------------------------------------------------------------------------------------
# The orchestrating process: never touches the device itself


def run_child(part, argv, timeout, env):
    """Run one part; its JSON lines as they come, plus a record of its failure if it fails."""
    cmd = [sys.executable, "-u", os.path.abspath(__file__), *argv, "--part", part]
    say(f"part {part} (at most {timeout:.0f} s)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    recs = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass
    rc = proc.wait()
    timer.cancel()
    if rc:
        why = f"killed after {timeout:.0f} s" if rc < 0 else f"exit status {rc}"
        recs.append(emit({"part": part, "failed": why}))
    return recs


def gb(x):
    return f"{x / 1e9:.3g}" if x else "-"


def pct(x):
    return f"{100 * x:.1f}%" if x is not None else "-"


def report(recs, t_start):
    """The table, and the same as one JSON line, with every MFU against the better of the two measured
    peaks."""
    env = next((r for r in recs if r.get("env")), {})
    measured = max((r["measured_tflops"] for r in recs if "peak" in r), default=None)
    datasheet = next((r["datasheet_tflops"] for r in recs if "peak" in r), None)
    runs = [bench.add_mfu(r, peaks_of(measured, datasheet), backend=env.get("backend", "unknown"))
            if "useful_tflops" in r else r for r in recs if "mode" in r]
    fit = next((r for r in recs if "fit_on_one_device" in r), None)
    failed = [r for r in recs if "failed" in r]
    emit({"summary": True, "env": env, "matmul_peak_tflops_measured": measured,
          "datasheet_peak_tflops": datasheet, "runs": runs, "fit_on_one_device": fit, "failed": failed,
          "seconds": round(time.time() - t_start, 1)})

    v = env.get("versions", {})
    print(f"\n{env.get('date')}  {env.get('device')} x{env.get('devices')} ({env.get('backend')}), "
          f"device memory {gb(env.get('device_memory_bytes'))} GB, jax {v.get('jax')}, "
          f"torch {v.get('torch')}, "
          f"transformers {v.get('transformers')}, {env.get('compute_dtype')}; examples: "
          f"{env.get('examples', {}).get('data_note')}")
    print(f"matmul peak: measured {measured or float('nan'):.4g} TFLOP/s per device (the better of first and "
          f"last), datasheet {datasheet or '-'}; 'step GB': XLA's figure for the compiled step, 'peak GB': "
          "the device's")
    print(f"{'config':10} {'mode':20} {'ex/step':>7} {'s/step':>7} {'real tok/s':>10} {'loss tok/s':>10} "
          f"{'TFLOP/s':>8} {'MFU meas':>8} {'MFU data':>8} {'compile s':>9} {'step GB':>7} {'peak GB':>7}")
    for r in runs:
        seven_b = r["config"].startswith("7b") and r.get("layers")
        mode = r["mode"] + (f", {r['layers']} layers" if seven_b else "")
        if "s_per_step" not in r:
            why = r.get("skipped") or f"{r.get('micro_batches')} micro-batches: does not fit: {r.get('why')}"
            print(f"{r['config']:10} {mode:20} {why}")
            continue
        print(f"{r['config']:10} {mode:20} {r['examples_per_step']:7.1f} {r['s_per_step']:7.3f} "
              f"{r['real_tokens_per_s']:10,.0f} {r['loss_tokens_per_s']:10,.0f} {r['useful_tflops']:8.3g} "
              f"{pct(r['mfu_vs_measured']):>8} {pct(r['mfu_vs_datasheet']):>8} "
              f"{r.get('compile_s', float('nan')):9.1f} "
              f"{gb(r.get('step_memory_bytes')):>7} {gb(r.get('device_peak_bytes')):>7}")
    if fit:
        verdict = "fits" if fit["full_fits"] else "does NOT fit"
        if fit["full_misses_by_bytes"]:
            verdict += f" (misses by {gb(fit['full_misses_by_bytes'])} GB)"
        print(f"\n{fit['fit_on_one_device']} on one device: the full step ({fit['layers']} layers, "
              f"{fit['full_micro_batches']} micro-batches) needs {gb(fit['full_step_memory_bytes'])} GB of "
              f"{gb(fit['memory_limit_bytes'])} GB: {verdict}")
        if fit.get("projected_hours") is not None:
            print(f"  the recipe: {fit['recipe_steps']} steps x {fit['s_per_step']:.3f} s = "
                  f"{fit['projected_hours']} h on this one device (no input, checkpoint or compile time)")
        elif fit.get("largest_fit"):
            lf = fit["largest_fit"]
            print(f"  largest that fits: {lf['layers']} layers, {lf['micro_batches']} micro-batches, "
                  f"{gb(lf['step_memory_bytes'])} GB, {lf['s_per_step']:.3f} s/step")
    for r in failed:
        print(f"part {r['part']} failed: {r['failed']}")
    print(f"\naccelerator benchmark took {time.time() - t_start:.0f} s")


def peaks_of(measured_tflops, datasheet_tflops):
    return {"measured": measured_tflops and measured_tflops * 1e12,
            "datasheet": datasheet_tflops and datasheet_tflops * 1e12}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n")[:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[5:]))
    p.add_argument("--small", action="store_true",
                   help="tiny stand-in configs and 2 timed steps (runs on a CPU)")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps per measurement (0: 3, or 2 with --small)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--budget_s", type=float, default=480,
                   help="the whole run's time; each part gets its share")
    p.add_argument("--memory_limit_gb", type=float, default=0,
                   help="device memory a step must fit in (below it, the 7b part tries smaller settings); "
                        "0: what the device reports (none on CPU)")
    p.add_argument("--compute_dtype", default="", help="'' = bfloat16 off CPU, float32 on CPU")
    p.add_argument("--cache_dir", default=os.path.join(bench.ROOT, ".cache"), help="tokenized examples")
    p.add_argument("--data", default=bench.SAMPLE,
                   help="Alpaca records (path or URL) for the example lengths; default: the 2,000-record "
                        "sample in tests/assets")
    p.add_argument("--part", choices=[n for n, _ in PARTS], help="run one part in this process and exit")
    # Set by the orchestrating process for a part: when it must be done, the peaks measured first.
    p.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument("--peak_tflops", type=float, nargs=2, default=(0, 0), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.small else 3)
    args.remat, args.hf_micro_batch = "on", 4  # as bench.py's flags
    if args.part:
        if not args.compute_dtype:
            args.compute_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        args.deadline = args.deadline or time.time() + args.budget_s
        args.peaks = peaks_of(*args.peak_tflops)
        return run_part(args)

    t_start = time.time()
    recs, share = [], 0.0
    for part, seconds in PARTS:
        share += seconds * args.budget_s / sum(s for _, s in PARTS)
        timeout = share - (time.time() - t_start)  # its share and what the parts before it left
        if timeout < 10:
            recs.append(emit({"part": part, "failed": "no time left in --budget_s"}))
            continue
        env = dict(os.environ)
        if part == "hf":
            env["JAX_PLATFORMS"] = "cpu"  # torch alone on the device (jax would take 95% of a GPU)
        first = next((r for r in recs if r.get("peak") == "peak"), None)
        extra = ["--deadline", str(time.time() + timeout)]
        if first:
            extra += ["--compute_dtype", first["dtype"], "--peak_tflops", str(first["measured_tflops"]),
                      str(first["datasheet_tflops"] or 0)]
        recs += run_child(part, argv + extra, timeout, env)
    report(recs, t_start)


if __name__ == "__main__":
    main()
