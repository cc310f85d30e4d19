"""The memory plan: what ONE device holds at the peak of a train step on N devices, before any is paid for.

    python benchmarks/memory_plan.py --model DIR --data FILE --data_parallel N --device_memory_gb G [flags]

Any flag of alpaca.py is taken, and the plan is that of those flags for --data_parallel devices (0: the
devices here). It reads the data, the tokenizer and the model's config.json, never the weights. The figure
is XLA's, not a formula: a child process with N virtual CPU devices compiles the real train step
(alpaca.make_step, what training runs) for the state and batch as shapes with their shardings
(sharding.abstract_state) and reports compiled.memory_analysis(). The arguments are the weights (with LoRA:
the frozen base's shard and the adapters), the AdamW moments and the batch (split by their known sizes);
the temporaries hold the float32 gradients (their known size) and the activations, the gathered weights
and whatever else the step needs at its peak. With --device_memory_gb (default: the HBM of the TPU this runs
on, or the part of a GPU's that JAX takes; on CPU a line of common devices instead) it says whether that
fits, and if not, which flags would, each checked by its own compile. Compiling the 7B step takes tens of
seconds on 2 CPU cores, so every result is cached in --cache_dir. The plan for a person goes to stderr; one
JSON line (the data statistics, with the plan as "memory") to stdout. `alpaca.py --dry_run` prints XLA's
total alone, for the devices it sees.
"""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import alpaca  # noqa: E402
import llama  # noqa: E402
import sharding  # noqa: E402

# HBM per jax device (1e9 bytes), from the datasheets: the first key found in a device's kind counts (a TPU
# v5e reports "TPU v5 lite"; a TPU v3 core has 16 GiB).
DEVICE_MEMORY_GB = {
    "TPU v3": 17.18, "TPU v4": 34.36, "TPU v5 lite": 17.18, "TPU v5e": 17.18, "TPU v5p": 102.0,
    "TPU v6 lite": 34.36, "TPU v6e": 34.36, "A100-SXM4-40GB": 40.0, "A100-PCIE-40GB": 40.0, "A100": 80.0,
    "H100": 80.0, "H200": 141.0,
}
COMMON_DEVICES = {"TPU v3 core": "TPU v3", "TPU v5e": "TPU v5e", "TPU v4": "TPU v4",
                  "A100-40GB": "A100-SXM4-40GB", "A100-80GB": "A100", "H100": "H100",
                  "H200": "H200"}  # the line printed on CPU: name -> kind


def device_memory_gb(device, override):
    """--device_memory_gb, else what a step may use on this device: a known TPU's HBM, or the part of a
    known GPU's that JAX takes (XLA_CLIENT_MEM_FRACTION or XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless
    set); None on CPU."""
    if override:
        return override
    kind = getattr(device, "device_kind", "")
    gb = next((v for k, v in DEVICE_MEMORY_GB.items() if k in kind), None)
    if gb and getattr(device, "platform", "") == "gpu":
        gb *= float(os.environ.get("XLA_CLIENT_MEM_FRACTION",
                                   os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")))
    return gb


def plan_run(c):
    """(data statistics, memory plan) of the flags `c` for c.data_parallel devices (0: the devices here),
    from config.json and the tokenizer alone."""
    n = c.data_parallel or jax.device_count()
    # model_config would check --data_parallel against the devices here, which are not those planned for;
    # the plan's own checks follow (hidden_size here, the rows of a step in step_rows).
    _, mc, lc = alpaca.model_config(dataclasses.replace(c, data_parallel=0), weights=False)
    if mc.hidden_size % n:
        raise alpaca.InputError(f"the model's hidden_size ({mc.hidden_size}) cannot be split over {n} "
                                "devices")
    examples, _, info = alpaca.prepare_data(c, mc, n, n)
    lengths = alpaca.example_lengths(examples)
    limit = device_memory_gb(jax.devices()[0], c.device_memory_gb)
    return info, memory_plan(c, mc, lc, lengths, n, limit)


def memory_plan(c, mc, lc, lengths, devices, limit_gb):
    """The memory plan of these flags on `devices` devices: XLA's figures per device, whether they fit a
    device of limit_gb, and if not, the flags that make them fit, each checked by its own compile."""
    rows, micro = alpaca.step_shape(c, lengths, devices, devices)
    plan = {"devices": devices, "rows": rows, "seq_len": c.seq_len, "micro_batches": micro,
            **memory_parts(compiled_memory(c, mc, lc, devices, rows, micro)), "device_memory_gb": limit_gb}
    if not limit_gb:
        return plan
    plan["fits"] = plan["total"] <= limit_gb * 1e9
    if not plan["fits"]:
        plan["fixes"] = _fixes(c, mc, lc, lengths, devices, plan, limit_gb * 1e9)
    return plan


def memory_parts(m):
    """Bytes per device at the peak of a step, by what holds them; the parts add up to the total."""
    grads = m["gradients"] if m["temporaries"] >= m["gradients"] else 0
    parts = {"parameters": m["parameters"], "adamw_moments": m["adamw_moments"],
             "batch_and_step_count": m["arguments"] - m["parameters"] - m["adamw_moments"],
             "gradients": grads, "activations_and_other_temporaries": m["temporaries"] - grads,
             "outputs_not_aliased": m["outputs"] - m["aliased"]}
    return {**parts, "total": sum(parts.values())}


def compiled_memory(c, mc, lc, devices, rows, micro):
    """XLA's memory figures (bytes per device) of the train step for `devices` devices and a step of
    rows x --seq_len in `micro` micro-batches, compiled in a child process on virtual CPU devices; cached."""
    request = {"config": dataclasses.asdict(c), "model_config": dataclasses.asdict(mc),
               "lora": lc and dataclasses.asdict(lc), "rows": rows, "micro_batches": micro}
    what = {**request, "devices": devices, "jax": jax.__version__, "seq_len": c.seq_len,
            "config": {k: getattr(c, k) for k in ("param_dtype", "compute_dtype", "no_remat")}}
    path = os.path.join(c.cache_dir, "memory", hashlib.sha256(json.dumps(what, sort_keys=True).encode())
                        .hexdigest()[:20] + ".json")
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    print(f"memory plan: compiling the train step for {devices} devices, {rows} rows x {c.seq_len} tokens, "
          f"{micro} micro-batch(es) ...", file=sys.stderr, flush=True)
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                           input=json.dumps(request), capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"compiling the train step for the memory plan failed:\n{child.stderr[-3000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.{os.getpid()}.partial", "w") as fh:
        json.dump(result, fh)
    os.replace(fh.name, path)
    return result


def compile_child():
    """The child process (stdin: one JSON request; the devices: N virtual CPU devices): compile the step,
    print its memory as JSON."""
    r = json.load(sys.stdin)
    c, mc = alpaca.Config(**r["config"]), llama.LlamaConfig(**r["model_config"])
    lc = r["lora"] and llama.LoraConfig(**{**r["lora"], "targets": tuple(r["lora"]["targets"])})
    mesh = sharding.make_mesh()
    state = sharding.abstract_state(mc, mesh, jnp.dtype(c.param_dtype), lc)
    t0 = time.perf_counter()
    m = alpaca.compile_step(c, mc, lc, mesh, r["rows"], r["micro_batches"]).memory_analysis()

    def shard_bytes(*trees):
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(trees))

    print(json.dumps({
        "arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
        "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
        "parameters": shard_bytes(state["trained"], state["frozen"]),  # LoRA: the base and the adapters
        "adamw_moments": shard_bytes(state["opt_state"]["mu"], state["opt_state"]["nu"]),
        "gradients": shard_bytes(state["opt_state"]["mu"]),  # float32, shaped and sharded as what is trained
        "compile_seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def _fixes(c, mc, lc, lengths, devices, plan, budget):
    """Flags that make the step fit `budget` bytes per device, each checked by compiling it. Three kinds,
    each a list along which memory falls, so a bisection finds the mildest change that fits in a few
    compiles: on the same devices (only when parameters and AdamW state alone fit there), (1) more
    micro-batches, fewer tokens per forward pass (the first split adds a float32 gradient accumulator, so it
    can cost memory); (2) shorter rows, as many of them, i.e. fewer examples per step; (3) more devices,
    the same flags. (bfloat16 master weights do not help: the update's float32 copies take it back.)"""
    def fits(x):
        rows, micro = alpaca.step_shape(x["config"], lengths, x["devices"], x["devices"])
        x["total"] = memory_parts(compiled_memory(x["config"], mc, lc, x["devices"], rows, micro))["total"]
        return x["total"] <= budget

    def candidate(n=devices, **flags):
        return {"config": dataclasses.replace(c, **flags), "devices": n, "flags": flags}

    def rows_of(t):  # the rows of a step of --seq_len t on these devices
        return alpaca.step_shape(dataclasses.replace(c, seq_len=t, micro_batch_size=0), lengths, devices,
                                devices)[0]

    tokens_per_pass = plan["rows"] // plan["micro_batches"] * plan["seq_len"]
    shorter = [c.seq_len >> i for i in range(1, 8) if c.seq_len >> i >= c.max_len]
    same_devices = plan["parameters"] + plan["adamw_moments"] < budget
    reset = {"micro_batch_size": 0} if c.micro_batch_size else {}  # new rows: a micro-batch may not fit
    kinds = [
        sorted((candidate(**({"seq_len": t} if t != c.seq_len else {}), micro_batch_size=m)
                for t in [c.seq_len] + shorter for rows in [rows_of(t)]
                for m in range(devices, rows, devices) if rows % m == 0 and m * t < tokens_per_pass),
               key=lambda x: (-x["flags"]["micro_batch_size"] * x["config"].seq_len, -x["config"].seq_len)),
        [candidate(seq_len=t, batch_size=max(1, c.batch_size * t // c.seq_len), **reset) for t in shorter],
    ] if same_devices else []
    kinds.append([candidate(n, data_parallel=n, **reset) for n in (2 * devices, 4 * devices)
                  if mc.hidden_size % n == 0 and not (c.no_pack and c.batch_size % n)])
    fixes = []
    for kind in kinds:
        found = _first_fitting(kind, fits)
        if found:
            fixes.append({"flags": " ".join(f"--{k} {v}" for k, v in found["flags"].items()),
                          "changes": found["flags"], "devices": found["devices"], "total": found["total"]})
    return fixes


def _first_fitting(candidates, fits):
    """The first candidate that fits, where fitting is monotone along the list (if one fits, all after it
    do): check the last, then bisect. 1 + log2(len) checks."""
    if not candidates or not fits(candidates[-1]):
        return None
    lo, hi = 0, len(candidates) - 1  # candidates[hi] fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(candidates[mid]) else (mid + 1, hi)
    return candidates[hi]


def format_memory_plan(p):
    """The plan as a few lines for a person."""
    gb = lambda b: f"{b / 1e9:7.2f} GB"  # noqa: E731
    names = {"parameters": "parameters", "adamw_moments": "AdamW moments (mu, nu)",
             "batch_and_step_count": "batch and step count", "gradients": "gradients (float32 shards)",
             "activations_and_other_temporaries": "activations, gathered weights, other temporaries",
             "outputs_not_aliased": "outputs not aliased to inputs"}
    lines = [f"memory per device at the peak of a step: {p['devices']} devices, {p['rows']} rows x "
             f"{p['seq_len']} tokens, {p['micro_batches']} micro-batch(es); XLA's figure for the compiled "
             "train step"]
    lines += [f"  {names[k]:<52}{gb(p[k])}" for k in names]
    lines.append(f"  {'total':<52}{gb(p['total'])}")
    if p.get("device_memory_gb"):
        verdict = "fits" if p["fits"] else "does NOT fit"
        lines.append(f"  {verdict} a device of {p['device_memory_gb']:g} GB (--device_memory_gb)")
        for f in p.get("fixes", []):
            lines.append(f"  fits with {f['flags']}: {f['total'] / 1e9:.2f} GB per device on {f['devices']} "
                         "devices")
        if not p["fits"] and not p.get("fixes"):
            lines.append("  no micro-batch, row length or device count tried fits: more devices, or a "
                         "smaller model")
    else:
        gbs = {name: DEVICE_MEMORY_GB[kind] for name, kind in COMMON_DEVICES.items()}
        lines.append("  fits: " + ", ".join(f"{name} ({g:g} GB) {'yes' if p['total'] <= g * 1e9 else 'no'}"
                                            for name, g in gbs.items()) + "; --device_memory_gb checks one")
    lines.append("  a planning estimate: buffer assignment on CPU, where this was compiled, differs a little "
                 "from a GPU's or TPU's")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--child"]:
        return compile_child()
    try:
        c = alpaca.parse_config(argv)
        alpaca.check_flags(c)
        info, plan = plan_run(c)
    except alpaca.InputError as e:
        print(f"memory_plan.py: error: {e}", file=sys.stderr)
        return 2
    print(format_memory_plan(plan), file=sys.stderr, flush=True)
    print(json.dumps({**info, "memory": plan}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
