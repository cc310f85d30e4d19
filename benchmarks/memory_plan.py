"""The memory plan: what ONE device holds at the peak of a train step, and whether it fits, before any machine
is paid for.

    python benchmarks/memory_plan.py --target v3-32 --model DIR --data FILE [alpaca.py's flags]
    python benchmarks/memory_plan.py --data_parallel 8 --device_memory_gb 16 --model DIR --data FILE

--target NAME (TARGETS below; --help lists them) compiles the real train step (alpaca.compile_step, what
training runs) for that machine's devices, as JAX on it sees them, with that machine's own compiler, on any
computer and without its hardware: libtpu for a TPU slice (pip install "jax[tpu]==0.10.2", ~700 MB), JAX's
CUDA plugin for NVIDIA GPUs (pip install "jax[cuda13]==0.10.2", several GB; deviceless). The figure is that
compiler's memory_analysis(); it is compared with what one device offers as its runtime counts it: a TPU's
usable HBM, the part of a GPU's memory that JAX takes (75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says
otherwise). A step the TPU compiler refuses does not fit: that is a verdict too. Without --target, XLA:CPU
compiles the step for --data_parallel virtual CPU devices (0: the devices here): an estimate of what a TPU's
or GPU's compiler would say.

Any flag of alpaca.py is taken. It reads the data, the tokenizer and the model's config.json, never the
weights: the state and batch are shapes with their shardings (sharding.abstract_state). Where the step does
not fit, it searches the flags that would (more micro-batches, shorter rows, LoRA where nothing else fits on
those devices, a bigger machine), each checked by compiling it with the same compiler. Each compile runs in a
child process (its devices set before jax starts) and is cached in --cache_dir: the 7B step takes tens of
seconds on 2 CPU cores. The plan for a person goes to stderr; one JSON line (the data statistics, with the
plan as "memory") to stdout. `alpaca.py --dry_run` prints XLA's total alone, for the devices it sees.
"""

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import re
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

# TPU slices as JAX on them sees them (names as Cloud TPU sells them): name -> (libtpu's topology name, JAX
# devices). A v3 chip is two devices (its TensorCores), a v4 or v5p chip one (megacore: two cores as one),
# a v5e or v6e chip one (one core). MaxText's accelerator_to_spec_map has the same for its users.
TPUS = {
    "v3-8": ("v3:2x2", 8), "v3-32": ("v3:4x4", 32), "v3-64": ("v3:4x8", 64),
    "v4-8": ("v4:2x2x1", 4), "v4-16": ("v4:2x2x2", 8), "v4-32": ("v4:2x2x4", 16),
    "v5e-1": ("v5e:1x1", 1), "v5e-4": ("v5e:2x2", 4), "v5e-8": ("v5e:2x4", 8), "v5e-16": ("v5e:4x4", 16),
    "v5e-32": ("v5e:4x8", 32),
    "v5p-8": ("v5p:2x2x1", 4), "v5p-16": ("v5p:2x2x2", 8), "v5p-32": ("v5p:2x2x4", 16),
    "v6e-1": ("v6e:1x1", 1), "v6e-4": ("v6e:2x2", 4), "v6e-8": ("v6e:2x4", 8), "v6e-16": ("v6e:4x4", 16),
    "v6e-32": ("v6e:4x8", 32),
}
MEGACORE = ("v4", "v5p")
# Bytes of HBM one device offers a program, as libtpu 0.0.42.1's compiler counts them (to 1 MiB; its refusals
# say e.g. "exceeds available HBM (15.48G)", in GiB): a little under the datasheets' 16, 32, 16, 95, 32 GiB.
# tests/test_memory_plan.py checks them against the compiler.
TPU_HBM = {"v3": 16_624_025_600, "v4": 33_013_760_000, "v5e": 16_909_107_200, "v5p": 102_803_046_400,
           "v6e": 33_549_516_800}

# NVIDIA GPUs as users rent them, from public specifications: name -> (device name, SMs, compute capability,
# memory in bytes as the driver reports it, L2 bytes, memory bandwidth in bytes/s, clock in GHz). A target
# is NAME-xN: N of them, 8 to a host (h100-x16 is two hosts).
GPUS = {
    "a100-40gb": ("NVIDIA A100-SXM4-40GB", 108, (8, 0), 42_331_013_120, 40 * 2**20, 1.555e12, 1.41),
    "a100-80gb": ("NVIDIA A100-SXM4-80GB", 108, (8, 0), 85_100_068_864, 40 * 2**20, 2.039e12, 1.41),
    "h100": ("NVIDIA H100 80GB HBM3", 132, (9, 0), 84_942_979_072, 50 * 2**20, 3.35e12, 1.98),
    "h200": ("NVIDIA H200", 132, (9, 0), 151_397_597_184, 50 * 2**20, 4.8e12, 1.98),
    "l4": ("NVIDIA L4", 58, (8, 9), 24_000_000_000, 48 * 2**20, 0.3e12, 2.04),  # the usual 24 GB card
}
GPU_COUNTS = (1, 2, 4, 8, 16, 32)
# What the compiler reads of an SM, by compute capability: shared memory per SM and per block (opt-in),
# threads per SM, FP32 units per SM.
SM = {(8, 0): (167_936, 166_912, 2048, 64), (8, 9): (102_400, 101_376, 1536, 128),
      (9, 0): (233_472, 232_448, 2048, 128)}
PIP = {"tpu": ("libtpu", 'pip install "jax[tpu]==0.10.2"'),
       "cuda": ("jax-cuda13-plugin", 'pip install "jax[cuda13]==0.10.2"')}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the step is planned for: `devices` devices of `platform` ("tpu", "cuda", or "cpu": the
    XLA:CPU estimate on virtual devices); `chip` is a TPU_HBM or GPUS key."""
    name: str
    platform: str
    devices: int
    topology: str = ""
    chip: str = ""


def target(name):
    """The Target of a --target NAME."""
    if name in TPUS:
        return Target(name, "tpu", TPUS[name][1], TPUS[name][0], name.split("-")[0])
    gpu, _, n = name.rpartition("-x")
    if gpu in GPUS and n.isdigit() and int(n) in GPU_COUNTS:
        n = int(n)
        return Target(name, "cuda", n, f"1x{max(1, n // 8)}x{min(n, 8)}", gpu)
    raise alpaca.InputError(f"--target {name}: unknown; known targets: {', '.join(target_names())}")


def target_names():
    gpus = "|".join(GPUS)
    return [*TPUS, f"{{{gpus}}}-x{{{'|'.join(map(str, GPU_COUNTS))}}}"]


class CompilerMissing(Exception):
    """The target's compiler is not installed: the message is one line naming the pip command."""


def compiler(t):
    """Which compiler plans for `t`, with its version."""
    if t.platform == "cpu":
        return "XLA:CPU estimate"
    dist, pip = PIP[t.platform]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise CompilerMissing(f"--target {t.name} compiles with the {t.platform.upper()} compiler, which is "
                              f"not installed: {pip} (without --target: an XLA:CPU estimate)") from None
    return f"TPU (libtpu {version})" if t.platform == "tpu" else f"CUDA (deviceless, {dist} {version})"


def mem_fraction():
    """The part of a GPU's memory that JAX takes, as JAX reads it."""
    return float(os.environ.get("XLA_CLIENT_MEM_FRACTION",
                                os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")))


def device_memory(t, fraction=None):
    """Bytes one device of target `t` offers a step as its runtime counts them."""
    if t.platform == "tpu":
        return TPU_HBM[t.chip]
    return GPUS[t.chip][3] * (fraction or mem_fraction())


def local_device_memory(device):
    """What a step may use on this device when no --target is given: a TPU's usable HBM, or the part of a
    GPU's that JAX takes; None on CPU or an unknown device."""
    kind = getattr(device, "device_kind", "")
    tpu = {"TPU v3": "v3", "TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
           "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
    chip = next((v for k, v in tpu.items() if kind.startswith(k)), None)
    if chip:
        return TPU_HBM[chip]
    gpu = next((k for k, v in GPUS.items() if v[0].removeprefix("NVIDIA ") in kind), None)
    return device_memory(Target("", "cuda", 1, chip=gpu)) if gpu else None


def plan_run(c, target_name=""):
    """(data statistics, memory plan) of the flags `c` on --target `target_name`, or without one for
    c.data_parallel virtual CPU devices (0: the devices here), from config.json and the tokenizer alone."""
    t = target(target_name) if target_name else Target("", "cpu", c.data_parallel or jax.device_count())
    if t.platform != "cpu" and c.data_parallel % t.devices:
        raise alpaca.InputError(f"--data_parallel {c.data_parallel}: --target {t.name} has {t.devices} "
                                f"devices, so it must be 0 or a multiple of {t.devices}")
    compiler(t)  # a missing compiler is reported before the data is read
    # model_config would check --data_parallel against the devices here, which are not those planned for;
    # the plan's own checks follow (hidden_size here, the rows of a step in step_shape).
    _, mc, lc = alpaca.model_config(dataclasses.replace(c, data_parallel=0), weights=False)
    if mc.hidden_size % t.devices:
        raise alpaca.InputError(f"the model's hidden_size ({mc.hidden_size}) cannot be split over "
                                f"{t.devices} devices" + (f" (--target {t.name})" if t.name else ""))
    examples, _, info = alpaca.prepare_data(c, mc, c.data_parallel or t.devices, t.devices)
    if c.device_memory_gb:
        limit = c.device_memory_gb * 1e9
    else:
        limit = local_device_memory(jax.devices()[0]) if t.platform == "cpu" else device_memory(t)
    return info, memory_plan(c, mc, lc, alpaca.example_lengths(examples), t, limit)


def memory_plan(c, mc, lc, lengths, t, limit):
    """The memory plan of these flags on target `t`: the compiler's figures per device, whether they fit
    `limit` bytes, and if not, the flags that make them fit, each checked by the same compiler."""
    rows, micro = alpaca.step_shape(c, lengths, c.data_parallel or t.devices, t.devices)
    m = compiled_memory(c, mc, lc, t, rows, micro)
    plan = {"target": t.name or None, "compiler": compiler(t), "devices": t.devices, "rows": rows,
            "seq_len": c.seq_len, "micro_batches": micro, **memory_parts(m),
            "compile_seconds": m["compile_seconds"]}
    if t.platform == "cuda":
        plan["gpu_memory_bytes"], plan["mem_fraction"] = GPUS[t.chip][3], mem_fraction()
    if "refused" in m:
        plan["refused"] = m["refused"]
    if not limit:
        return plan
    if c.device_memory_gb:
        of = "--device_memory_gb"
    elif t.platform == "tpu":
        of = f"the usable HBM of one device, {limit / 2**30:.2f} GiB as libtpu counts it"
    elif t.platform == "cuda":
        of = (f"the {mem_fraction():.0%} of the GPU's {GPUS[t.chip][3] / 1e9:.2f} GB that JAX takes "
              "(XLA_PYTHON_CLIENT_MEM_FRACTION)")
    else:
        of = f"what a {jax.devices()[0].device_kind} offers"
    plan.update(device_memory_bytes=int(limit), device_memory_gb=limit / 1e9, device_memory_of=of,
                fits=plan["total"] <= limit and "refused" not in m)
    if t.platform == "cuda" and not c.device_memory_gb:
        plan["fits_at_mem_fraction_0.95"] = plan["total"] <= device_memory(t, 0.95) and "refused" not in m
    if not plan["fits"]:
        plan["fixes"] = _fixes(c, mc, lc, lengths, t, plan, limit)
    return plan


def memory_parts(m):
    """Bytes per device at the peak of a step, by what holds them; the parts add up to the total. (After a
    refusal: the arguments, which are known, and the temporaries the compiler said it needs.)"""
    grads = m["gradients"] if m["temporaries"] >= m["gradients"] else 0
    parts = {"parameters": m["parameters"], "adamw_moments": m["adamw_moments"],
             "batch_and_step_count": m["arguments"] - m["parameters"] - m["adamw_moments"],
             "gradients": grads, "activations_and_other_temporaries": m["temporaries"] - grads,
             "outputs_not_aliased": m["outputs"] - m["aliased"]}
    return {**parts, "total": sum(parts.values())}


def compiled_memory(c, mc, lc, t, rows, micro):
    """The compiler's memory figures (bytes per device) of the train step on target `t` for a step of
    rows x --seq_len in `micro` micro-batches, compiled in a child process; cached."""
    request = {"config": dataclasses.asdict(c), "model_config": dataclasses.asdict(mc),
               "lora": lc and dataclasses.asdict(lc), "rows": rows, "micro_batches": micro,
               "target": dataclasses.asdict(t)}
    what = {**request, "jax": jax.__version__, "compiler": compiler(t), "seq_len": c.seq_len,
            "config": {k: getattr(c, k) for k in ("param_dtype", "compute_dtype", "no_remat")}}
    path = os.path.join(c.cache_dir, "memory", hashlib.sha256(json.dumps(what, sort_keys=True).encode())
                        .hexdigest()[:20] + ".json")
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    # JAX_PLATFORMS=cpu: the target's devices are compile-only ones; the CUDA plugin needs it with no GPU.
    # libtpu takes a lock file against a second process using the chips; compiling uses none.
    env.update(JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={t.devices if t.platform == 'cpu' else 1}")
    print(f"memory plan: compiling the train step{f' (LoRA rank {lc.rank})' if lc else ''} for "
          f"{t.name or f'{t.devices} virtual CPU devices'}, {rows} rows x {c.seq_len} tokens, {micro} "
          "micro-batch(es) ...", file=sys.stderr, flush=True)
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                           input=json.dumps(request), capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"compiling the train step for the memory plan failed:\n{child.stderr[-3000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with llama.replaced(path, unique=True) as tmp, open(tmp, "w") as fh:
        json.dump(result, fh)
    return result


def target_devices(t):
    """The devices of target `t` as JAX on it would see them: compile-only ones for a TPU or GPU."""
    if t.platform == "cpu":
        return jax.devices()
    from jax.experimental import topologies
    if t.platform == "cuda":
        return topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(t.chip),
                                            topology=t.topology).devices
    options = {"chip_config_name": "megacore"} if t.chip in MEGACORE else {}
    if math.prod(map(int, re.findall(r"\d+", t.topology.split(":")[1]))) == 1:
        options["chips_per_host_bounds"] = (1, 1, 1)  # libtpu assumes hosts of 2x2 chips otherwise
    return topologies.get_topology_desc(platform="tpu", topology_name=t.topology, **options).devices


def gpu_target_config(name):
    """A GPU of GPUS as the CUDA plugin's compiler reads it: a GpuTargetConfig in protobuf text form."""
    device, sms, (major, minor), memory, l2, bandwidth, ghz = GPUS[name]
    shared, shared_optin, threads, fpus = SM[(major, minor)]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {shared} shared_memory_per_block_optin: {shared_optin}
  threads_per_core_limit: {threads} core_count: {sms} fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  memory_bandwidth: {int(bandwidth)} l2_cache_size: {l2} clock_rate_ghz: {ghz} device_memory_size: {memory}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{device}"
"""


def compile_child():
    """The child process (stdin: one JSON request): compile the step for the target's devices, print its
    memory as JSON; a step the compiler refuses for lack of memory is a result too."""
    r = json.load(sys.stdin)
    c, mc = alpaca.Config(**r["config"]), llama.LlamaConfig(**r["model_config"])
    lc = r["lora"] and llama.LoraConfig(**{**r["lora"], "targets": tuple(r["lora"]["targets"])})
    mesh = sharding.make_mesh(devices=target_devices(Target(**r["target"])))
    state = sharding.abstract_state(mc, mesh, jnp.dtype(c.param_dtype), lc)

    def shard_bytes(*trees):
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(trees))

    known = {"parameters": shard_bytes(state["trained"], state["frozen"]),  # LoRA: the base and the adapters
             "adamw_moments": shard_bytes(state["opt_state"]["mu"], state["opt_state"]["nu"]),
             "gradients": shard_bytes(state["opt_state"]["mu"])}  # float32, shaped and sharded as trained
    t0 = time.perf_counter()
    try:
        m = alpaca.compile_step(c, mc, lc, mesh, r["rows"], r["micro_batches"]).memory_analysis()
        figures = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
                   "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes}
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The TPU compiler's refusal: "... HLO temporaries (16.06G) exceeds available HBM (15.48G)" (GiB).
        line = next(x for x in str(e).splitlines() if "RESOURCE_EXHAUSTED" in x)
        line = line[line.index("RESOURCE_EXHAUSTED"):]
        need = re.search(r"temporaries \(([\d.]+)G\)", line)
        figures = {"arguments": shard_bytes(state, alpaca.abstract_batch(mesh, r["rows"], c.seq_len)),
                   "temporaries": int(float(need[1]) * 2**30) if need else 0, "outputs": 0, "aliased": 0,
                   "refused": line}
    print(json.dumps({**known, **figures, "compile_seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def _fixes(c, mc, lc, lengths, t, plan, budget):
    """Flags that make the step fit `budget` bytes per device, each checked by compiling it for its target.
    Each kind is a list along which memory falls, so a bisection finds the mildest change that fits in a few
    compiles: on the same devices (only when parameters and AdamW state alone fit there), (1) more
    micro-batches, fewer tokens per forward pass (the first split adds a float32 gradient accumulator, so it
    can cost memory); (2) shorter rows, as many of them, i.e. fewer examples per step; (3) where neither
    fits a full fine-tune, LoRA (rank 8, a bfloat16 base), in ever more micro-batches; then (4) more
    devices of the same kind, the same flags. (bfloat16 master weights do not help: the update's float32
    copies take it back.)"""
    def fits(x):
        x_t = x["target"]
        rows, micro = alpaca.step_shape(x["config"], lengths, x["config"].data_parallel or x_t.devices,
                                        x_t.devices)
        x_lc = alpaca.model_config(dataclasses.replace(x["config"], data_parallel=0), weights=False)[2]
        m = compiled_memory(x["config"], mc, x_lc, x_t, rows, micro)
        x["total"] = memory_parts(m)["total"]
        return x["total"] <= budget and "refused" not in m

    def candidate(where=t, **flags):
        return {"config": dataclasses.replace(c, **flags), "target": where, "flags": flags}

    def rows_of(t_len):  # the rows of a step of --seq_len t_len on these devices
        return alpaca.step_shape(dataclasses.replace(c, seq_len=t_len, micro_batch_size=0), lengths,
                                 c.data_parallel or t.devices, t.devices)[0]

    n = t.devices
    tokens_per_pass = plan["rows"] // plan["micro_batches"] * plan["seq_len"]
    shorter = [c.seq_len >> i for i in range(1, 8) if c.seq_len >> i >= c.max_len]
    same_devices = plan["parameters"] + plan["adamw_moments"] < budget
    reset = {"micro_batch_size": 0} if c.micro_batch_size else {}  # new rows: a micro-batch may not fit
    kinds = [
        sorted((candidate(**({"seq_len": s} if s != c.seq_len else {}), micro_batch_size=m)
                for s in [c.seq_len] + shorter for rows in [rows_of(s)]
                for m in range(n, rows, n) if rows % m == 0 and m * s < tokens_per_pass),
               key=lambda x: (-x["flags"]["micro_batch_size"] * x["config"].seq_len, -x["config"].seq_len)),
        [candidate(seq_len=s, batch_size=max(1, c.batch_size * s // c.seq_len), **reset) for s in shorter],
    ] if same_devices else []
    fixes = []
    for kind in kinds:
        found = _first_fitting(kind, fits)
        if found:
            fixes.append(found)
    if not fixes and not c.lora_rank:
        rows = rows_of(c.seq_len)
        lora = {"lora_rank": 8, "param_dtype": "bfloat16"}  # what --lora_rank 8 defaults to
        found = _first_fitting([candidate(**lora, micro_batch_size=m if m < rows else 0)
                                for m in range(rows, n - 1, -n) if rows % m == 0], fits)
        fixes += [found] if found else []
    if t.platform == "cpu":
        bigger = [Target("", "cpu", k * n) for k in (2, 4)]
    elif t.platform == "tpu":  # the next slices of the same chip
        bigger = [target(x) for x in TPUS if x.startswith(f"{t.chip}-") and TPUS[x][1] > n][:2]
    else:
        bigger = [target(f"{t.chip}-x{k}") for k in GPU_COUNTS if k > n][:2]
    more = [candidate(x, data_parallel=x.devices if x.platform == "cpu" else 0, **reset) for x in bigger
            if mc.hidden_size % x.devices == 0 and not (c.no_pack and c.batch_size % x.devices)]
    found = _first_fitting(more, fits)
    fixes += [found] if found else []
    out = []
    for f in fixes:  # param_dtype: what --lora_rank defaults to
        flags = {k: v for k, v in f["flags"].items() if k != "param_dtype" and getattr(c, k) != v}
        if f["target"] != t and f["target"].name:
            flags["target"] = f["target"].name
        out.append({"flags": " ".join(f"--{k} {v}" for k, v in flags.items()), "changes": flags,
                    "devices": f["target"].devices, "total": f["total"]})
    return out


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
    devices = f"{p['devices']} device{'s' if p['devices'] > 1 else ''}"
    where = f"{p['target']} ({devices})" if p["target"] else devices
    lines = [f"memory per device at the peak of a step: {where}, {p['rows']} rows x {p['seq_len']} tokens, "
             f"{p['micro_batches']} micro-batch(es); compiler: {p['compiler']}"]
    if p.get("refused"):
        arguments = p["parameters"] + p["adamw_moments"] + p["batch_and_step_count"]
        lines += [f"  the compiler refused the step: {p['refused']}",
                  f"  {'arguments (state and batch)':<52}{gb(arguments)}",
                  f"  {'temporaries (as the refusal counts them)':<52}{gb(p['total'] - arguments)}",
                  f"  {'total':<52}{gb(p['total'])}"]
    else:
        lines += [f"  {names[k]:<52}{gb(p[k])}" for k in names] + [f"  {'total':<52}{gb(p['total'])}"]
    if p.get("device_memory_bytes"):
        lines.append(f"  {'fits' if p['fits'] else 'does NOT fit'} in {p['device_memory_bytes'] / 1e9:.2f} "
                     f"GB per device ({p['device_memory_of']})")
        if "fits_at_mem_fraction_0.95" in p:
            at = 0.95 * p["gpu_memory_bytes"] / 1e9
            lines.append(f"  with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 ({at:.2f} GB): "
                         f"{'fits' if p['fits_at_mem_fraction_0.95'] else 'does NOT fit'}")
        if any("lora_rank" in f["changes"] for f in p.get("fixes", [])):  # tried only where nothing else fits
            lines.append("  no full fine-tune fits these devices, at any micro-batch count or row length "
                         "tried")
        for f in p.get("fixes", []):
            lora = " (LoRA wants an --lr like 3e-4)" if "lora_rank" in f["changes"] else ""
            lines.append(f"  fits with {f['flags']}: {f['total'] / 1e9:.2f} GB per device on "
                         f"{f['devices']} device{'s' if f['devices'] > 1 else ''}{lora}")
        if not p["fits"] and not p.get("fixes"):
            lines.append("  no micro-batch, row length, LoRA or device count tried fits: a bigger machine, "
                         "or a smaller model")
    elif not p["target"]:
        usable = {n: device_memory(target(n)) for n in ("v3-8", "v4-8", "v5e-8", "v5p-8", "v6e-8",
                                                        "a100-40gb-x1", "a100-80gb-x1", "h100-x1", "h200-x1")}
        lines.append("  fits a device of: " + ", ".join(
            f"{n.rsplit('-', 1)[0]} ({b / 1e9:.2f} GB) {'yes' if p['total'] <= b else 'no'}"
            for n, b in usable.items()) + "; --device_memory_gb checks one")
    if not p["target"]:
        lines.append("  an estimate: XLA:CPU compiled this for virtual CPU devices; --target NAME asks the "
                     "compiler of the machine itself")
    return "\n".join(lines)


def parse_args(argv):
    """(--target, alpaca.py's Config) of the planner's command line."""
    p = argparse.ArgumentParser(
        prog="memory_plan.py", description=__doc__.split("\n\n")[0], add_help=True,
        epilog="Every other flag is alpaca.py's (python alpaca.py --help): the plan is that of those flags.")
    p.add_argument("--target", default="", help="compile for this machine with its own compiler, on "
                   'this computer: a TPU slice (libtpu: pip install "jax[tpu]==0.10.2"), ' + ", ".join(TPUS)
                   + '; or N NVIDIA GPUs (the CUDA plugin: pip install "jax[cuda13]==0.10.2"; l4 is a 24 GB '
                   f"card), {target_names()[-1]}; '' = an XLA:CPU estimate for --data_parallel devices")
    a, rest = p.parse_known_args(argv)
    return a.target, alpaca.parse_config(rest)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--child"]:
        return compile_child()
    try:
        name, c = parse_args(argv)
        alpaca.check_flags(c)
        info, plan = plan_run(c, name)
    except alpaca.InputError as e:
        print(f"memory_plan.py: error: {e}", file=sys.stderr)
        return 2
    except CompilerMissing as e:
        print(f"memory_plan.py: {e}", file=sys.stderr)
        return 1
    print(format_memory_plan(plan), file=sys.stderr, flush=True)
    print(json.dumps({**info, "memory": plan}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
