"""Alpaca fine-tuning of Llama in plain JAX: the command line, the run, the data and the exports.

Stanford Alpaca fine-tunes LLaMA on 52K records: each becomes a prompt (a template around the instruction
and optional input) followed by the output, and the loss is taken on the output and EOS only. Stanford and
Levanter pad every example; Alpaca's average 127 tokens, so most of their compute goes to padding. Here
whole examples are *packed* into rows of `seq_len` tokens, with segment ids and positions that restart per
example: attention never crosses examples, and the loss is padding's at a fraction of the token slots.
llama.py is the model; sharding.py splits it over the devices (FSDP) and writes the train step.

Read top to bottom: the flags; train(), a run as named phases, and the phases; then the plumbing in the
order a run uses it: checks, records, tokens, the plan of rows and steps, batches, hosts, checkpoints,
export. Bad input raises InputError naming the flag, file or record: main prints it and exits with status 2.
"""

import argparse
import dataclasses
import errno
import fcntl
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import traceback
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from huggingface_hub import HfApi
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

import llama
import sharding

# --- 1. Flags -----------------------------------------------------------------------------------------

# Stanford's 52K records at a pinned commit, taken only if their git blob id is the one that commit records.
ALPACA_DATA_URL = ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/"
                   "761dc5bfbdeeffa89b8bff5d038781a4055f796a/alpaca_data.json")
PINNED_DOWNLOADS = {ALPACA_DATA_URL: "3779ddbc040543ab1834ef216c983d6fcc06cc9a"}  # URL -> git blob id


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    model: str = _f("meta-llama/Llama-2-7b-hf", "Hugging Face Llama: a local directory or a Hub repo id")
    tokenizer: str = _f("", "tokenizer.model, or a directory or Hub repo holding one; '' = --model's")
    data: str = _f(ALPACA_DATA_URL, "Alpaca records: a .json or .jsonl file or an http(s) URL of one")
    cache_dir: str = _f(".cache", "where downloads and tokenized data are kept")
    # How much: Stanford trains 3 epochs of 52,002 records at 128 a step, about 1218 steps.
    steps: int = _f(0, "optimizer steps; 0 = as many as --epochs takes")
    epochs: int = _f(3, "passes over the data, each in a fresh order from --seed (when --steps is 0)")
    batch_size: int = _f(128, "examples per optimizer step (on average when packing)")
    micro_batch_size: int = _f(0, "rows per forward/backward pass (gradient accumulation); 0 = all")
    max_len: int = _f(512, "examples are truncated to this many tokens (Stanford's model_max_length)")
    # 2048: ~128 examples fill 8 rows at >99% real tokens, a row per device of an 8-chip host. Small models
    # pay relatively more for attention over long rows: 512 suits them.
    seq_len: int = _f(2048, "tokens per packed row; with --no_pack, the length every example is padded to")
    no_pack: bool = _f(False, "one example per row (what Stanford and Levanter do)")
    data_parallel: int = _f(0, "plan each step's rows for this many devices (a multiple of those here); "
                               "0 = the devices here, or what a resumed checkpoint planned for")
    # Optimizer: AdamW, 3% linear warmup then cosine to 0, as Stanford's Trainer arguments.
    lr: float = _f(2e-5, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.03, "fraction of the steps spent in linear warmup")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = no clipping")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    seed: int = _f(0, "seed of the data order and of LoRA's adapters")
    param_dtype: str = _f("", "weights and AdamW state; '' = float32, with --lora_rank bfloat16 for the base")
    compute_dtype: str = _f("bfloat16", "dtype of the forward and backward matmuls")
    lora_rank: int = _f(0, "LoRA: train adapters of this rank on the frozen base (wants an --lr like 3e-4)")
    lora_alpha: float = _f(8.0, "LoRA's update x A B is scaled by lora_alpha / lora_rank")
    lora_targets: str = _f("q,k,v,o,gate,up,down", "LoRA: the matrices adapted in every decoder layer")
    no_remat: bool = _f(False, "keep every layer's activations instead of recomputing them: faster, bigger")
    # The run directory, checkpoints, logs, exports: filesystem paths (a bucket: mount it).
    out: str = _f("runs/alpaca", "run directory (checkpoints, metrics.jsonl, exports); one run at a time")
    checkpoint_every: int = _f(200, "steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    log_every: int = _f(10, "steps between progress lines")
    dry_run: bool = _f(False, "plan the data, compile the step for the devices here, print the memory one "
                              "device needs at its peak, exit (machines not here: benchmarks/memory_plan.py)")
    device_memory_gb: float = _f(0.0, "--dry_run: GB of one device; 0 = what a GPU or TPU reports")
    hf_save_path: str = _f("", "exports: DIR/step_N every --hf_save_steps, DIR/final at the end; '' = OUT/hf")
    hf_save_steps: int = _f(0, "steps between Hugging Face exports; 0 = only at the end")
    hf_upload: str = _f("", "Hub repo id to upload the final export to; '' = no upload")
    hf_dtype: str = _f("bfloat16", "dtype of the exported weights")
    wandb_project: str = _f("", "log to this Weights & Biases project (needs wandb); '' = off")
    sample_instruction: str = _f("", "after training, answer this instruction with the export")
    sample_tokens: int = _f(128, "most new tokens of that answer")
    preset: str = _f("", "'demo': stories260K on the Alpaca sample in tests/assets, a few minutes on CPU "
                         "(flags given explicitly still win)")

    def __post_init__(self):  # LoRA adds nothing to the frozen base, so bfloat16 loses nothing there
        if not self.param_dtype:
            object.__setattr__(self, "param_dtype", "bfloat16" if self.lora_rank else "float32")


class InputError(Exception):
    """Bad flags, data or tokenizer: the message names what to fix. main prints it and exits 2."""


class Stopped(Exception):
    """The run stops itself (a diverged loss, a failed checkpoint write), keeping its checkpoints: exit 1."""


@contextmanager
def input_error(what):
    """llama.py's errors (and the OS's) in the block, as an InputError naming `what`: a flag, usually."""
    try:
        yield
    except (llama.CheckpointError, OSError) as e:
        raise InputError(f"{what}: {e}")


# The README's first command: a real tiny Llama on 2,000 real Alpaca records (tests/assets/), in float32.
PRESETS = {"demo": dict(model="tests/assets/stories260K", data="tests/assets/alpaca/alpaca_sample_2000.json",
                        seq_len=512, max_len=512, batch_size=32, steps=60, lr=1e-3, warmup_ratio=0.05,
                        compute_dtype="float32", hf_dtype="float32", out="runs/demo", log_every=5,
                        checkpoint_every=20, sample_instruction="Give three tips for staying healthy.",
                        sample_tokens=64)}


def parse_config(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = dict(action="store_true") if f.type is bool else dict(type=f.type, default=f.default)
        parser.add_argument(f"--{f.name}", help=f.metadata["help"], **flag)
    preset = parser.parse_known_args(argv)[0].preset
    if preset not in ("", *PRESETS):
        raise InputError(f"--preset {preset}: unknown; known presets: {', '.join(PRESETS)}")
    here = os.path.dirname(os.path.abspath(__file__))  # a preset's paths are relative to this file
    parser.set_defaults(**{k: os.path.join(here, v) if k in ("model", "data") else v
                           for k, v in PRESETS.get(preset, {}).items()})
    return Config(**vars(parser.parse_args(argv)))


def main_process():
    """Process 0: with several hosts, the one that prints, logs, and writes meta.json and the exports."""
    return jax.process_index() == 0


def say(*args):  # print, on process 0 only
    if main_process():
        print(*args, flush=True)


# --- 2. The run ---------------------------------------------------------------------------------------
# train() is a run's whole life, one phase a line; the phases follow, in that order. Whatever the flags, the
# data or the devices get wrong, preflight finds before a weight is read or a file written.


def train(c):
    run = preflight(c)  # flags x config.json x data x devices x --out x the checkpoint to resume: all checked
    say(plan_line(run.stats, run.mesh.size))
    with own_out(run):  # one run at a time on --out; what a crash left there goes
        step = make_step(c, run.mc, run.lc, run.mesh, run.plan["steps"], run.plan["micro_batches"])
        state = restore_or_load(run)  # the latest complete checkpoint, or the HF weights
        logs = open_logs(run)  # metrics.jsonl cut back to the checkpoint, wandb
        stop, state = train_loop(run, step, state, logs)  # steps, logs, checkpoints; SIGTERM and Ctrl-C
        if stop:  # 143 (SIGTERM): a supervisor restarts the run, which resumes; 130 (Ctrl-C)
            return 128 + stop
        return finish(run, state)  # the HF (and PEFT) export, upload, sample


@dataclass(frozen=True)
class Run:
    """What preflight derived from the flags, the model's config.json, the data and the devices."""
    c: Config
    model_dir: str
    mc: llama.LlamaConfig
    lc: llama.LoraConfig | None  # None: a full fine-tune
    mesh: jax.sharding.Mesh
    examples: dict  # tokenize_records'
    plan: dict  # plan_steps', with the step's micro_batches
    stats: dict  # of the data and the plan, for the logs
    meta: dict  # what each checkpoint's meta.json records of this run
    start: int  # the step of the checkpoint to resume from; 0 = a fresh start
    resumed: dict | None  # that checkpoint's meta.json
    damaged: list  # the steps of newer checkpoints, damaged: skipped
    exports: str  # --hf_save_path, or OUT/hf
    t_launch: float


def preflight(c):
    """The Run, once every check of section 3 has passed: nothing is loaded or written but a probe file."""
    t_launch = time.time()
    check_flags(c)
    model_dir, mc, lc = model_config(c)
    mesh = mesh_for(c, mc, lc)
    start, resumed, damaged = resume_point(c.out)  # a resumed run keeps the data plan it started with
    planned = c.data_parallel or (resumed or {}).get("data_parallel") or jax.device_count()
    examples, plan, stats = prepare_data(c, mc, planned, jax.device_count())
    if problem := why_unwritable(c.out):
        raise InputError(f"--out {c.out}: not a writable directory ({problem})")
    problem = why_unwritable(c.hf_save_path) if c.hf_save_path and main_process() else ""
    if from_process_0(bool(problem)):  # only process 0 writes exports; every process stops with its message
        raise InputError(f"--hf_save_path {c.hf_save_path}: not a writable directory on process 0 "
                         f"({problem or 'see its log'})")
    if from_process_0(bool(c.wandb_project) and main_process() and not importlib.util.find_spec("wandb")):
        raise InputError("--wandb_project needs wandb on process 0: pip install wandb")
    data_hash = hashlib.sha256(b"".join(np.ascontiguousarray(examples[k]).tobytes()  # the examples planned
                                        for k in ("tokens", "offsets", "loss_start"))).hexdigest()[:32]
    meta = {"config": dataclasses.asdict(c), "model_config": dataclasses.asdict(mc), "data_parallel": planned,
            "data_hash": data_hash, "base_fingerprint": lc and llama.weights_fingerprint(model_dir)}
    if start:
        check_resumable(resumed, c, meta, checkpoint_dir(c.out, start))
    return Run(c=c, model_dir=model_dir, mc=mc, lc=lc, mesh=mesh, examples=examples, plan=plan, stats=stats,
               meta=meta, start=start, resumed=resumed, damaged=damaged,
               exports=c.hf_save_path or os.path.join(c.out, "hf"), t_launch=t_launch)


def plan_line(stats, devices):
    line = (f"data: {stats['examples']} examples ({stats['dropped']} dropped), {stats['steps']} steps of "
            f"{stats['rows_per_step']} rows x {stats['seq_len']} tokens, ~{stats['examples_per_step']} "
            f"examples/step, {stats['packing_efficiency']:.1%} of token slots real, {stats['micro_batches']} "
            f"micro-batch(es), {devices} device(s)")
    if abs(stats["examples_per_step"] - stats["batch_size"]) > 0.25 * stats["batch_size"]:
        line += (f"\nwarning: a step holds ~{stats['examples_per_step']:.0f} examples, not --batch_size "
                 f"{stats['batch_size']}: its rows are a multiple of the devices; shorter rows come closer")
    return line


def make_step(c, mc, lc, mesh, steps, micro_batches):
    """The train step of these flags: what train() runs and what --dry_run compiles."""
    opt = sharding.AdamWConfig(lr=c.lr, b1=c.beta1, b2=c.beta2, eps=c.eps, weight_decay=c.weight_decay,
                               grad_clip=c.grad_clip, warmup_steps=math.ceil(c.warmup_ratio * steps),
                               total_steps=steps)  # warmup: the HF Trainer's ceil of the ratio
    return sharding.make_train_step(mc, mesh, opt, compute_dtype=jnp.dtype(c.compute_dtype),
                                    num_micro_batches=micro_batches, remat=not c.no_remat, lora=lc)


@contextmanager
def own_out(run):
    """Take --out: lock out a second run, check that every process sees it, delete what crashes left."""
    out, lock, fd, owner = run.c.out, os.path.join(run.c.out, ".lock"), None, ""
    token = from_process_0(int.from_bytes(os.urandom(3), "little"))
    if main_process():
        os.makedirs(out, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # held while process 0 lives
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel drops it however the process ends
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):  # held by a live process
                owner = os.read(fd, 200).decode(errors="replace") or "?"
            else:  # a filesystem without locks
                say(f"warning: {lock}: no lock ({e.strerror}): a second run would not be refused")
    try:
        if from_process_0(bool(owner)):
            raise InputError(f"--out {out} is in use by another run ({owner or 'see process 0'}). Wait for "
                             "it to end or stop it, or choose another --out")
        if main_process():  # the claim: what a second run names, and what every process must see here
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"host {os.uname().nodename}, pid {os.getpid()}, since {time.ctime()} "
                             f"({token})".encode())
            except OSError as e:  # a full disk: os.write's error names no file
                raise OSError(e.errno, e.strerror, lock) from e
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("out-claimed")
            for _ in range(10):  # network filesystems may lag
                seen = os.path.exists(lock) and f"({token})" in open(lock).read()
                if seen:
                    break
                time.sleep(0.5)
            blind = [i for i, (ok,) in enumerate(all_processes(seen)) if not ok]
            if blind:
                raise InputError(f"--out {out}: process(es) {blind} do not see what process 0 wrote there. "
                                 "--out must be one directory that all hosts share (NFS, GCS FUSE, ...)")
        if main_process():
            for s in run.damaged:  # skipped by preflight; remove_uncommitted deletes the rest
                os.remove(os.path.join(checkpoint_dir(out, s), "meta.json"))
            remove_uncommitted(out)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # the lock goes with it


SAVED = ("trained", "opt_state")  # what a checkpoint holds of the state (sharding.py); "frozen" is --model's
STOP = {"signal": 0}  # SIGTERM or a first Ctrl-C: the loop writes a checkpoint and exits at the next step


def restore_or_load(run):
    """The training state: what is trained and its AdamW state from the checkpoint, the rest from --model."""
    c, steps = run.c, run.plan["steps"]
    like = sharding.abstract_state(run.mc, run.mesh, jnp.dtype(c.param_dtype), run.lc)
    saved = {}
    if run.start:
        saved = llama.load_slices(checkpoint_dir(c.out, run.start), {k: like[k] for k in SAVED})
        say(f"resuming from {checkpoint_dir(c.out, run.start)} (step {run.start} of {steps}, written by "
            f"{run.resumed['processes']} process(es) x {run.resumed['devices']} devices)")
    if run.start >= steps:
        say(f"all {steps} steps are done")
    if run.start and not like["frozen"]:  # every weight was in the checkpoint
        return {**saved, "frozen": {}}
    if run.lc:
        n, base = (sum(x.size for x in jax.tree.leaves(like[k])) for k in ("trained", "frozen"))
        say(f"LoRA: rank {run.lc.rank}, alpha {run.lc.alpha:g} on {','.join(run.lc.targets)}: {n:,} "
            f"trainable parameters; the base's {base:,} are frozen in {c.param_dtype}")
    say(f"loading {c.model} ...")
    params = llama.load_hf(run.model_dir, dtype=jnp.dtype(c.param_dtype),
                           shardings=jax.tree.map(lambda x: x.sharding, like["frozen"] or like["trained"]))[1]
    return {**sharding.init_state(run.mc, params, run.lc, jax.random.key(c.seed)), **saved}


def on_stop_signal(signum, _frame):
    STOP["signal"] = signum
    if signum == signal.SIGINT:  # from now on Ctrl-C takes its default action: the process ends at once
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.write(2, b"Ctrl-C: stopping after this step with a checkpoint; Ctrl-C again stops at once, losing "
                    b"the steps since the last checkpoint\n")  # not print: the handler may interrupt one


def train_loop(run, step_fn, state, logs):
    """Steps from run.start, each on a batch built during the step before: (stop signal or 0, state)."""
    c, steps = run.c, run.plan["steps"]
    batch_of = functools.partial(host_batch, run.examples, run.plan, sharding.batch_sharding(run.mesh))
    batch = batch_of(run.start) if run.start < steps else None
    checkpoints = Checkpointer(c.out, run.meta, c.keep_checkpoints)
    default = {s: signal.signal(s, on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for k in range(run.start, steps):
            state, m = step_fn(state, batch)
            batch = batch_of(k + 1) if k + 1 < steps else None  # built while the devices run step k
            m = {key: float(v) for key, v in jax.device_get(m).items()}
            if k == run.start:
                say(f"first step done {time.time() - run.t_launch:.1f}s after start (includes compilation)")
            if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
                checkpoints.poll(wait=True)  # the last good one, committed
                raise Stopped(f"step {k + 1}: loss {m['loss']}, grad_norm {m['grad_norm']}: training "
                              f"diverged (a lower --lr, in another --out?); nothing was written for this "
                              f"step. {what_is_kept(c.out)}")
            log_step(run, logs, k, m)
            stop = checkpoints.poll()  # all processes: a stop signal anywhere? the write in flight done?
            if stop or k + 1 == steps or (c.checkpoint_every and (k + 1) % c.checkpoint_every == 0):
                checkpoints.save(k + 1, {key: state[key] for key in SAVED}, wait=stop or k + 1 == steps)
            if stop:
                say(f"{signal.Signals(stop).name}: checkpoint written at step {k + 1}; exiting")
                return stop, state
            if c.hf_save_steps and (k + 1) % c.hf_save_steps == 0 and k + 1 < steps:
                checkpoints.poll(wait=True)  # host memory: one write at a time
                export_hf(run, state, os.path.join(run.exports, f"step_{k + 1:08d}"))
        return 0, state
    finally:
        for s, handler in default.items():  # Ctrl-C while exporting interrupts at once
            signal.signal(s, handler)


# MFU: model FLOPs (llama.train_flops) over the datasheet's dense bf16 TFLOP/s of a jax device (the first key
# found in its kind: "TPU v5 lite" before "TPU v5").
PEAK_TFLOPS = {"TPU v3": 61.5, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5": 459.0,
               "TPU v6": 918.0, "A100": 312.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0}


def open_logs(run):
    """The log book: metrics.jsonl cut back to the checkpoint, wandb if asked, the window's counters."""
    c, path, kept, damaged = run.c, os.path.join(run.c.out, "metrics.jsonl"), [], []
    if main_process() and os.path.exists(path):
        with open(path, errors="replace") as fh:
            for n, line in enumerate(fh, 1):  # a line cut short by a kill has no newline: dropped
                try:
                    kept += [line] if json.loads(line)["step"] <= run.start and line.endswith("\n") else []
                except (ValueError, KeyError, TypeError):  # damaged: named, dropped; never fatal
                    damaged += [n] if line.endswith("\n") else []
        if damaged:
            say(f"warning: {path}: line(s) {damaged[:10]} are not a step's JSON record; dropped")
        with llama.replaced(path) as tmp, open(tmp, "w") as fh:
            fh.writelines(kept)
    wandb = None
    if c.wandb_project and main_process():
        import wandb  # optional; preflight found it
        wandb.init(project=c.wandb_project, config=dataclasses.asdict(c), resume="allow")
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in jax.devices()[0].device_kind), None)
    return {"path": path if main_process() else None, "wandb": wandb, "peak": peak, "t_window": time.time(),
            "tokens": 0, "flops": 0.0, "last_logged": run.start}


def log_step(run, logs, k, m):
    """Add step k's tokens and FLOPs to the window; log it every --log_every steps and at the end."""
    plan, step, steps, R = run.plan, k + 1, run.plan["steps"], run.plan["rows_per_step"]
    lens = example_lengths(run.examples)[plan["order"][plan["row_start"][k * R]:plan["row_start"][step * R]]]
    logs["tokens"] += int(lens.sum())
    logs["flops"] += llama.train_flops(run.mc, lens, frozen_weights=run.lc is not None)
    if step % run.c.log_every and step != steps:
        return
    now = time.time()
    dt = max(now - logs["t_window"], 1e-9)  # since the last line (the first window includes compilation)
    tflops = logs["flops"] / dt / jax.device_count() / 1e12
    rec = {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
           "loss_tokens": int(m["n_tokens"]), "tokens_per_s": logs["tokens"] / dt,
           "tflops_per_device": tflops, "mfu": tflops / logs["peak"] if logs["peak"] else None,
           "eta_s": dt / (step - logs["last_logged"]) * (steps - step), "elapsed_s": now - run.t_launch}
    mfu = f"  mfu {rec['mfu']:.1%}" if rec["mfu"] is not None else ""
    eta = f"{int(rec['eta_s'] // 3600)}:{time.strftime('%M:%S', time.gmtime(rec['eta_s']))}"  # 30 h: 30:00:00
    say(f"step {step}/{steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.3g}  grad_norm {rec['grad_norm']:.3f}  "
        f"tokens/s {rec['tokens_per_s']:,.0f}  {tflops:.3g} TFLOP/s/device{mfu}  eta {eta}")
    if logs["path"]:
        try:
            with open(logs["path"], "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        except OSError as e:  # name the file, which a failed write does not
            raise OSError(e.errno, e.strerror, logs["path"]) from e
        if logs["wandb"]:
            logs["wandb"].log(rec, step=step)
    logs.update(t_window=now, tokens=0, flops=0.0, last_logged=step)


def finish(run, state):
    """The final export; then process 0 alone uploads it and answers --sample_instruction. Exit status."""
    c, final, status = run.c, os.path.join(run.exports, "final"), 0
    export_hf(run, state, final)
    if jax.process_count() > 1:
        # What is left is process 0's alone. Leave the distributed system now: at exit the others would wait
        # for process 0 at jax.distributed's shutdown barrier, which aborts them all after 300 s.
        jax.distributed.shutdown()
    if c.hf_upload and main_process():
        try:
            HfApi().create_repo(c.hf_upload, exist_ok=True, private=True)
            HfApi().upload_folder(repo_id=c.hf_upload, folder_path=final, commit_message="Alpaca fine-tune")
        except Exception as e:
            say(f"upload to {c.hf_upload} failed ({type(e).__name__}: {e}); the export is kept at {final}")
            status = 3
        else:
            say(f"uploaded {final} to https://huggingface.co/{c.hf_upload}")
    if c.sample_instruction and main_process():
        say(f"\n### Instruction:\n{c.sample_instruction}\n\n### Response (the fine-tuned model, greedy):")
        say(respond(final, c.sample_instruction, max_new_tokens=c.sample_tokens))
    return status


# --- 3. Preflight's checks, each in one place, each naming the flag, file or record to fix ------------

FLAG_RULES = {  # rule: (its test, the flags it applies to)
    "positive": (lambda v: v > 0, "batch_size max_len seq_len lr lora_alpha"),
    "in [0, 1)": (lambda v: 0 <= v < 1, "beta1 beta2"),
    ">= 0": (lambda v: v >= 0, "steps epochs micro_batch_size data_parallel checkpoint_every hf_save_steps "
                               "eps weight_decay grad_clip device_memory_gb lora_rank"),
    "in [0, 1]": (lambda v: 0 <= v <= 1, "warmup_ratio"),
    "at least 1": (lambda v: v >= 1, "log_every keep_checkpoints"),
    "float32, bfloat16 or float16": (lambda v: v in ("float32", "bfloat16", "float16"),
                                     "param_dtype compute_dtype hf_dtype")}
PATH_FLAGS = ("model", "tokenizer", "data", "cache_dir", "out", "hf_save_path")


def check_flags(c):
    """The flags that cannot work on their own."""
    for rule, (test, names) in FLAG_RULES.items():
        for name in names.split():
            if not test(getattr(c, name)):  # `not`, so that NaN fails too
                raise InputError(f"--{name} must be {rule}, got {getattr(c, name)!r}")
    for name in PATH_FLAGS:  # gs://, s3://, hdfs://...: os.makedirs would make a local folder "gs:"
        value = getattr(c, name)
        if re.match(r"[A-Za-z][\w+.-]*://", value) and not (name == "data" and value.startswith("http")):
            raise InputError(f"--{name} {value}: this program reads and writes filesystem paths, not URLs. "
                             "Mount a bucket (e.g. gcsfuse --implicit-dirs BUCKET /mnt/BUCKET) and give a "
                             "path in it (e.g. /mnt/BUCKET/run1)")
    if c.steps == 0 and c.epochs == 0:
        raise InputError("give a positive --steps or --epochs")
    if c.seq_len < c.max_len:
        raise InputError(f"--seq_len ({c.seq_len}) must be at least --max_len ({c.max_len}): an example is "
                         "never split across rows")
    unknown = [t for t in lora_targets(c) if t not in llama.LORA_TARGETS]
    if unknown or not lora_targets(c):
        raise InputError(f"--lora_targets {c.lora_targets!r}: unknown {unknown or 'empty'}; choose from "
                         f"{','.join(llama.LORA_TARGETS)}")
    pruned = os.path.realpath(os.path.join(c.out, "checkpoints"))
    if c.hf_save_path and os.path.commonpath([pruned, os.path.realpath(c.hf_save_path)]) == pruned:
        raise InputError(f"--hf_save_path {c.hf_save_path}: inside {os.path.join(c.out, 'checkpoints')}, "
                         "where checkpoint pruning deletes directories; choose a path outside it")


def lora_targets(c):
    return [t.strip() for t in c.lora_targets.split(",") if t.strip()]


def model_config(c, weights=True):
    """(model directory, LlamaConfig, LoraConfig or None), checked; weights=False reads config.json alone."""
    with input_error(f"--model {c.model}"):
        model_dir = llama.resolve_model_path(c.model, allow_patterns=None if weights else ["config.json"])
        mc = llama.check_checkpoint(model_dir)[0] if weights else llama.read_config(model_dir)
    if c.seq_len > mc.max_position_embeddings:
        raise InputError(f"--seq_len {c.seq_len} is above the model's max_position_embeddings "
                         f"({mc.max_position_embeddings})")
    if not c.lora_rank:
        return model_dir, mc, None
    targets = tuple(t for t in llama.LORA_TARGETS if t in lora_targets(c))
    lc = llama.LoraConfig(c.lora_rank, c.lora_alpha, targets)
    for t in lc.targets:  # a rank above a matrix's smaller side would not be low-rank
        n_in, n_out = llama.param_shapes(mc)["layers"][llama.LORA_TARGETS[t]][1:]
        if c.lora_rank > min(n_in, n_out):
            raise InputError(f"--lora_rank {c.lora_rank} is larger than the smallest dimension of a matrix "
                             f"it adapts: {t} is [{n_in}, {n_out}] in this model")
    return model_dir, mc, lc


def mesh_for(c, mc, lc):
    """The mesh of every device here, checked against --data_parallel and the model's shapes."""
    devices = jax.device_count()
    if c.data_parallel % devices:
        raise InputError(f"--data_parallel {c.data_parallel}: training splits the rows of a step over all "
                         f"{devices} devices, so it must be 0 or a multiple of {devices}")
    mesh = sharding.make_mesh()
    try:
        sharding.state_specs(mc, mesh, lc)  # every weight must split over the devices
    except ValueError as e:
        raise InputError(str(e))
    return mesh


def prepare_data(c, mc, planned, devices):
    """(examples, plan, stats): a step's rows planned for `planned` devices and split over `devices`."""
    t0, records = time.perf_counter(), load_records(c.data, c.cache_dir)
    examples, stats, hit = tokenize_cached(records, load_tokenizer(c.tokenizer or c.model), c.max_len,
                                           c.cache_dir)
    if examples["tokens"].max(initial=0) >= mc.vocab_size:
        raise InputError(f"--tokenizer {c.tokenizer or c.model}: token id {examples['tokens'].max()} is "
                         f"outside the model's vocabulary of {mc.vocab_size}: the tokenizer is not --model's")
    lengths = example_lengths(examples)
    R, micro = step_shape(c, lengths, planned, devices)
    plan = plan_steps(lengths, seed=c.seed, rows_per_step=R, seq_len=c.seq_len, epochs=c.epochs,
                      steps=c.steps, pack=not c.no_pack)
    plan["micro_batches"] = micro
    return examples, plan, {**stats, **plan_stats(plan, lengths), "seq_len": c.seq_len, "max_len": c.max_len,
                            "batch_size": c.batch_size, "data_parallel": planned, "micro_batches": micro,
                            "tokenize_seconds": round(time.perf_counter() - t0, 3), "cache_hit": hit}


def step_shape(c, lengths, planned, devices):
    """(rows, micro-batches) of a step: rows planned for `planned` devices, split over `devices`."""
    if len(lengths) == 0:
        raise InputError("no examples left to train on: all were dropped (is --max_len shorter than the "
                         "prompts?)")
    if c.no_pack and c.batch_size % planned:
        raise InputError(f"--batch_size {c.batch_size} with --no_pack (one example per row) must be a "
                         f"multiple of the data-parallel size ({planned})")
    R = choose_rows_per_step(lengths, batch_size=c.batch_size, seq_len=c.seq_len, data_parallel=planned,
                             pack=not c.no_pack)
    if R % devices:  # only a run resumed on another device count gets here
        raise InputError(f"--out {c.out}: the checkpoint to resume planned steps of {R} rows (for "
                         f"--data_parallel {planned}): they cannot be split over {devices} devices; resume "
                         f"on a device count that divides {R}")
    m = c.micro_batch_size
    if m and (R % m or m % devices):
        raise InputError(f"--micro_batch_size {m}: a micro-batch must divide the {R} rows of a step and be a "
                         f"multiple of the {devices} devices; valid here: "
                         f"{[v for v in range(devices, R + 1, devices) if R % v == 0]}")
    return R, R // m if m else 1


def why_unwritable(path):
    """Why no directory can be made or written at `path` ('' if one can), as a probe file tells."""
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    probe = os.path.join(parent, f".write-test-{os.uname().nodename}-{os.getpid()}")
    try:
        open(probe, "w").close()
        os.remove(probe)
        return ""
    except OSError as e:
        return e.strerror or type(e).__name__


def check_resumable(resumed, c, meta, where):
    """Refuse the checkpoint at `where` (meta.json `resumed`) if its run computed otherwise, naming how."""
    # The flags that change what a run computes (--data_parallel apart: 0 means "as the checkpoint planned").
    keys = ("model data tokenizer max_len seq_len no_pack batch_size micro_batch_size steps epochs lr "
            "weight_decay warmup_ratio grad_clip beta1 beta2 eps seed param_dtype compute_dtype lora_rank "
            "lora_alpha lora_targets").split()
    diffs = [f"--{k} {resumed['config'].get(k)!r} (this run: {getattr(c, k)!r})" for k in keys
             if resumed["config"].get(k) != getattr(c, k)]
    if c.data_parallel and c.data_parallel != resumed["data_parallel"]:
        diffs.append(f"--data_parallel {resumed['data_parallel']} (this run: {c.data_parallel})")
    if resumed["model_config"] != meta["model_config"]:
        diffs.append("the model's config.json")
    if resumed["data_hash"] != meta["data_hash"]:
        diffs.append("the data (its tokenized examples differ, although --data may name the same file)")
    if resumed.get("base_fingerprint") != meta["base_fingerprint"] and not diffs:
        diffs.append("the base model's weights (--model holds others than the adapters were trained on)")
    if diffs:
        raise InputError(f"{where} was written by a different run: " + "; ".join(diffs) +
                         ". Use the same settings to resume, or another --out to start afresh.")


# --- 4. Records: {instruction, input, output} from a .json list, a .jsonl file or an http(s) URL ------


def load_records(source, cache_dir=".cache", shown=None, jsonl=None):
    """Alpaca records of a file or URL (`shown`: its name in errors); a missing or null `input` is ""."""
    if source.startswith(("http://", "https://")):
        return download_records(source, cache_dir)
    if os.path.isdir(source):
        raise InputError(f"--data {source}: a directory, not a data file (a .json or .jsonl file of records)")
    if not os.path.isfile(source):
        raise InputError(f"--data {source}: no such file")
    shown, rows, jsonl = shown or source, [], source.endswith(".jsonl") if jsonl is None else jsonl
    try:
        with open(source, encoding="utf-8-sig") as fh:  # -sig: a byte-order mark, as Windows editors write
            if jsonl:
                for n, line in enumerate(fh, 1):
                    rows += [(f"line {n}", json.loads(line))] if line.strip() else []
            else:
                rows = json.load(fh)
                if not isinstance(rows, list):
                    raise InputError(f"{shown}: expected a JSON list of records, got a {type(rows).__name__}")
                rows = [(f"record {i}", r) for i, r in enumerate(rows)]
    except json.JSONDecodeError as e:  # in a .jsonl file, line n's
        where = f"line {n}" if jsonl else f"line {e.lineno} column {e.colno}"
        raise InputError(f"{shown}: {where}: malformed JSON ({e.msg})")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{shown}: cannot read ({type(e).__name__}: {e})")
    if not rows:
        raise InputError(f"{shown}: the data set is empty")
    records = []
    for where, r in rows:
        if not isinstance(r, dict):
            raise InputError(f"{shown}: {where}: expected an object with instruction/input/output, got "
                             f"{type(r).__name__}")
        for key in ("instruction", "output"):
            if key not in r:
                raise InputError(f"{shown}: {where}: missing field '{key}'")
        r = {"instruction": r["instruction"], "input": "" if r.get("input") is None else r["input"],
             "output": r["output"]}
        for key, value in r.items():  # "input": null (some variants' missing input) became ""
            if not isinstance(value, str):
                raise InputError(f"{shown}: {where}: field '{key}' is {type(value).__name__}, not a string")
        records.append(r)
    return records


def git_blob_id(path):
    """What `git hash-object` prints for the file: sha1 of b"blob <size>\\0" followed by its bytes."""
    with open(path, "rb") as fh:
        return hashlib.sha1(b"blob %d\0" % os.path.getsize(path) + fh.read()).hexdigest()


def download_records(url, cache_dir):
    """A .json/.jsonl URL's records, downloaded once: kept in cache_dir/downloads if whole, pinned, Alpaca."""
    ext = os.path.splitext(urllib.parse.urlparse(url).path)[1]
    if ext not in (".json", ".jsonl"):
        raise InputError(f"--data {url}: a URL must name a .json or .jsonl file")
    path = os.path.join(cache_dir, "downloads", hashlib.sha256(url.encode()).hexdigest()[:20] + ext)
    if os.path.exists(path):
        return load_records(path, shown=f"--data {url} (cached as {path})")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise InputError(f"--cache_dir {cache_dir}: cannot write the download of {url} there ({e})")
    print(f"downloading {url} ...", file=sys.stderr, flush=True)
    try:
        with llama.replaced(path, unique=True) as tmp:  # several hosts may download at once
            with open(tmp, "wb") as fh, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, fh, 1 << 20)
                size, expected = fh.tell(), response.headers.get("Content-Length")
            if expected is not None and size != int(expected):
                raise InputError(f"--data {url}: the download stopped after {size} of {expected} bytes")
            if url in PINNED_DOWNLOADS and git_blob_id(tmp) != PINNED_DOWNLOADS[url]:
                raise InputError(f"--data {url}: the downloaded file ({size} bytes) has git blob id "
                                 f"{git_blob_id(tmp)}, not the pinned {PINNED_DOWNLOADS[url]}: not the file "
                                 "this URL should serve")
            return load_records(tmp, shown=f"--data {url}: the download is not Alpaca data: {url}",
                                jsonl=ext == ".jsonl")  # not tmp's name: it ends in .partial
    except InputError:
        raise
    except Exception as e:  # HTTP errors, resets, timeouts: all mean "no data from here"
        raise InputError(f"--data {url}: the download failed ({type(e).__name__}: {e})")


# --- 5. Prompts and tokens ----------------------------------------------------------------------------

PROMPT_DICT = {  # Stanford Alpaca's (train.py), character for character
    "prompt_input": ("Below is an instruction that describes a task, paired with an input that provides "
                     "further context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"),
    "prompt_no_input": ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")}


def format_prompt(record):
    return PROMPT_DICT["prompt_input" if record.get("input") else "prompt_no_input"].format_map(record)


def load_tokenizer(path):
    """llama.load_tokenizer: a tokenizer.model file, or a model directory's or Hub repo's."""
    with input_error("tokenizer"):
        return llama.load_tokenizer(path)


# The loss boundary. Stanford tokenizes prompt + output as one text and masks the first len(prompt ids)
# tokens. For ~3% of Alpaca the output starts with "-" and joint tokenization merges "Response:" + "-" into
# one token ":-", so the boundary falls inside a token (stanford_alpaca PR #229) and the model trains on a
# prompt it never sees at inference. We keep the boundary exact: the prompt is encoded alone, as a user's
# prompt is at inference, and the output as its continuation, without SentencePiece's dummy-prefix "▁" on
# its first word. Wherever no token straddles the boundary this equals Stanford's ids token for token.
# SentencePiece has no per-call switch for the dummy prefix, so the outputs are encoded by a copy of the
# model with normalizer_spec.add_dummy_prefix = false, edited in the serialized protobuf. A parser merges a
# message field given twice, so we append ModelProto's field 3 (normalizer_spec) holding only its field 3
# (add_dummy_prefix) = 0: tag 0x1a (3, length-delimited), length 2, tag 0x18 (3, varint), 0x00.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"
CACHE_VERSION = 1  # of tokenize_records' output, in tokenize_cached's key: bump it when that changes


def tokenize_records(records, sp, max_len):
    """Examples and statistics. examples is a ragged set of int32 token sequences, one per kept record:
       tokens     int32[sum of lengths]  BOS + prompt + output + EOS of every example, concatenated
       offsets    int64[N + 1]           example i is tokens[offsets[i]:offsets[i + 1]]
       loss_start int32[N]               index in the example of the first output token (1 + prompt ids)
       record     int32[N]               index of the example's record in `records`
    Truncation keeps the first max_len tokens; an example with no output token or EOS left is dropped."""
    prompt_ids = sp.encode([format_prompt(r) for r in records], num_threads=os.cpu_count())
    continuation = spm.SentencePieceProcessor(model_proto=sp.serialized_model_proto() + NO_DUMMY_PREFIX)
    output_ids = continuation.encode([r["output"] for r in records], num_threads=os.cpu_count())
    seqs, loss_start, kept, truncated = [], [], [], 0
    for i, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        ids = [sp.bos_id()] + p + o + [sp.eos_id()]
        truncated += len(ids) > max_len
        if 1 + len(p) < min(len(ids), max_len):  # else the output is cut entirely: nothing to learn from
            seqs.append(ids[:max_len])
            loss_start.append(1 + len(p))
            kept.append(i)
    lengths = np.array([len(s) for s in seqs], np.int64)
    examples = {"tokens": np.fromiter(itertools.chain.from_iterable(seqs), np.int32, int(lengths.sum())),
                "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                "loss_start": np.array(loss_start, np.int32), "record": np.array(kept, np.int32)}
    stats = {"records": len(records), "examples": len(seqs), "dropped": len(records) - len(seqs),
             "truncated": truncated, "tokens": int(lengths.sum()),
             "loss_tokens": int((lengths - examples["loss_start"]).sum())}
    return examples, stats


def example_lengths(examples):
    return np.diff(examples["offsets"])


def tokenize_cached(records, sp, max_len, cache_dir):
    """tokenize_records through a file named by a hash of its inputs: (examples, stats, cache_hit)."""
    h = hashlib.sha256()
    for part in (str(CACHE_VERSION), json.dumps(PROMPT_DICT, sort_keys=True), str(max_len),
                 json.dumps(records, ensure_ascii=False, separators=(",", ":"))):
        h.update(part.encode("utf-8") + b"\0")
    h.update(sp.serialized_model_proto())
    path = os.path.join(cache_dir, f"alpaca-tokens-{h.hexdigest()[:20]}.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            stats = json.loads(str(z["stats"]))
            return {k: z[k] for k in ("tokens", "offsets", "loss_start", "record")}, stats, True
    except Exception:
        pass  # missing or unreadable: tokenize (again)
    examples, stats = tokenize_records(records, sp, max_len)
    try:
        os.makedirs(cache_dir, exist_ok=True)  # below, a name of its own: a pod's hosts may write at once
        with llama.replaced(path, unique=True) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, stats=np.array(json.dumps(stats)), **examples)
    except OSError as e:
        raise InputError(f"--cache_dir {cache_dir}: cannot write the tokenization cache ({e})")
    return examples, stats, False


# --- 6. The plan: a token budget per step, a fixed number of rows, greedy first-fit with look-ahead ---
# Every step has R rows of T = seq_len tokens, R fixed for the run (a multiple of the data-parallel size) so
# that shapes never change and nothing recompiles. R is chosen from the data so that a step holds about
# batch_size examples: R ~ batch_size * mean length / T. Each epoch shuffles the examples from (seed, epoch).
# A step takes the examples waiting in a window (the oldest first, then the next ones of the shuffled stream,
# LOOKAHEAD in all) and puts each into the first row where it fits; the others wait for the next step. The
# oldest waiting example always fits (a step starts empty and max_len <= T), so none waits long, none is
# split, and each is used once per epoch; the last step of an epoch may be part empty. The plan of a whole
# run takes well under a second, so the batch of step k is a pure function of (seed, k, data): a resumed run
# needs no replay. (Measured packing efficiency: the README's "Data and packing".)
LOOKAHEAD = 512


def choose_rows_per_step(lengths, *, batch_size, seq_len, data_parallel=1, pack=True):
    """R: about batch_size examples a step, a multiple of the data-parallel size (micro-batches split it)."""
    if not pack:
        return batch_size
    rows = batch_size * float(np.mean(lengths)) / (seq_len * 0.99)
    return data_parallel * max(1, round(rows / data_parallel))


def plan_steps(lengths, *, seed, rows_per_step, seq_len, epochs=0, steps=0, pack=True):
    """Which examples go into which row of which step, for `steps` steps (or `epochs` epochs if steps=0):
       order      int32[M]                example ids in row order: step by step, row by row
       row_start  int64[steps * R + 1]    row r of step k holds order[row_start[k*R+r] : row_start[k*R+r+1]]
       epoch      int32[steps]            the epoch of each step
    plus the ints steps, rows_per_step, seq_len, steps_per_epoch."""
    lengths, R, T = np.asarray(lengths), rows_per_step, seq_len
    rows, epoch_of_step, epoch = [], [], 0
    while (steps and len(epoch_of_step) < steps) or (not steps and epoch < epochs):
        perm = np.random.default_rng([seed, epoch]).permutation(len(lengths))
        epoch_rows = _pack_epoch(perm, lengths, R, T) if pack else \
            [[int(i)] for i in perm] + [[] for _ in range(-len(perm) % R)]
        rows += epoch_rows
        epoch_of_step += [epoch] * (len(epoch_rows) // R)
        epoch += 1
    n = steps or len(epoch_of_step)
    rows = rows[:n * R]
    return {"order": np.array([i for row in rows for i in row], np.int32),
            "row_start": np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64),
            "epoch": np.array(epoch_of_step[:n], np.int32),
            "steps": n, "rows_per_step": R, "seq_len": T, "steps_per_epoch": epoch_of_step.count(0)}


def _pack_epoch(perm, lengths, R, T):
    """The rows of one epoch, R per step, by greedy first-fit over a look-ahead window (above)."""
    out, window, next_ = [], [], 0
    while window or next_ < len(perm):
        take = perm[next_:next_ + LOOKAHEAD - len(window)]
        window, next_ = window + [int(i) for i in take], next_ + len(take)
        free, rows, waiting, most_free = [T] * R, [[] for _ in range(R)], [], T
        for i in window:
            n = int(lengths[i])
            if n > most_free:
                waiting.append(i)
                continue
            r = next(r for r in range(R) if free[r] >= n)
            rows[r].append(i)
            free[r] -= n
            most_free = max(free)
        out += rows
        window = waiting
    return out


def plan_stats(plan, lengths):
    R, T, steps = plan["rows_per_step"], plan["seq_len"], plan["steps"]
    return {"steps": steps, "steps_per_epoch": plan["steps_per_epoch"], "rows_per_step": R,
            "examples_per_step": round(len(plan["order"]) / steps, 2),
            "packing_efficiency": round(float(np.asarray(lengths)[plan["order"]].sum()) / (steps * R * T), 4)}


# --- 7. Batches: five [R, T] arrays (sharding.BATCH_KEYS) ---------------------------------------------
#   tokens       the input tokens; 0 on padding
#   targets      the token each position must predict: tokens[r, t + 1] within the same example, else 0
#   loss_mask    1.0 where targets[r, t] is an output token or the EOS of the example, else 0.0
#   segment_ids  1, 2, 3, ... for the examples of a row, 0 for padding: attention stays within a segment
#   positions    0, 1, 2, ... restarting at each example's first token; 0 on padding


def make_batch(examples, plan, step, span=None):
    """The batch of `step`, or only its rows span[0]:span[1]."""
    if not 0 <= step < plan["steps"]:
        raise IndexError(f"step {step} is outside the plan's {plan['steps']} steps")
    R, T = plan["rows_per_step"], plan["seq_len"]
    lo, hi = span or (0, R)
    b = {k: np.zeros((hi - lo, T), np.float32 if k == "loss_mask" else np.int32) for k in sharding.BATCH_KEYS}
    tokens, offsets, loss_start = examples["tokens"], examples["offsets"], examples["loss_start"]
    for r in range(lo, hi):
        g, t, x = step * R + r, 0, r - lo
        for seg, i in enumerate(plan["order"][plan["row_start"][g]:plan["row_start"][g + 1]], 1):
            ids = tokens[offsets[i]:offsets[i + 1]]
            n = len(ids)
            b["tokens"][x, t:t + n] = ids
            b["targets"][x, t:t + n - 1] = ids[1:]
            b["loss_mask"][x, t + loss_start[i] - 1:t + n - 1] = 1.0  # the positions that predict output/EOS
            b["segment_ids"][x, t:t + n] = seg
            b["positions"][x, t:t + n] = np.arange(n)
            t += n
    return b


def abstract_batch(mesh, rows, seq_len):
    """A batch as jax.ShapeDtypeStructs (make_batch's dtypes) with its sharding: what a step compiles for."""
    return {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=sharding.batch_sharding(mesh)) for k in sharding.BATCH_KEYS}


def host_batch(examples, plan, batch_sharding, step):
    """The batch of `step` as global jax.Arrays, this process building its devices' rows alone: several spans
    where the mesh interleaves hosts (jax.make_mesh follows a pod's torus, not its hosts)."""
    R, T = plan["rows_per_step"], plan["seq_len"]
    held = batch_sharding.addressable_devices_indices_map((R, T)).values()
    parts = [make_batch(examples, plan, step, span) for span in sorted({i[0].indices(R)[:2] for i in held})]
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.concatenate([p[k] for p in parts]),
                                                      (R, T)) for k in parts[0]}


# --- 8. Several hosts (README: "Several hosts") -------------------------------------------------------
# One process per host, joined by jax.distributed: each builds its devices' rows and writes their slices.


def init_distributed():
    """Join the job's other processes, as the JAX_* variables or a Cloud TPU VM's metadata say."""
    env = os.environ
    try:
        timeouts = dict(initialization_timeout=int(env.get("JAX_INIT_TIMEOUT", 300)),
                        heartbeat_timeout_seconds=int(env.get("JAX_HEARTBEAT_TIMEOUT", 100)))
        n, i = int(env.get("JAX_NUM_PROCESSES", 0)), int(env.get("JAX_PROCESS_ID", -1))
    except ValueError as e:
        raise InputError(f"the JAX_* environment variables must be integers: {e}")
    if "JAX_COORDINATOR_ADDRESS" in env:
        if not 0 <= i < n:
            raise InputError("JAX_COORDINATOR_ADDRESS is set: every process also needs JAX_NUM_PROCESSES and "
                             "its own JAX_PROCESS_ID, from 0 to JAX_NUM_PROCESSES - 1")
        if env.get("JAX_PLATFORMS", "cpu") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across hosts
        print(f"process {i} of {n}: joining the others at {env['JAX_COORDINATOR_ADDRESS']}; unless all start "
              f"the same command within JAX_INIT_TIMEOUT={timeouts['initialization_timeout']} s, JAX stops "
              "this one (DEADLINE_EXCEEDED). If one dies later, the others stop too: restart them all with "
              "the same command, and the run resumes from its last complete checkpoint",
              file=sys.stderr, flush=True)
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=i, **timeouts)
    elif getattr(sys.modules.get("jax._src.cloud_tpu_init"), "running_in_cloud_tpu_vm", False) or \
            env.get("TPU_WORKER_HOSTNAMES"):  # what `import jax` found (private: hence getattr), or GKE
        jax.distributed.initialize(**timeouts)  # the slice's workers, count and id from the TPU metadata


def all_processes(*values):
    """The int values of every process: an array [processes, values], the same on every process."""
    mine = np.array([values], np.int32)
    if jax.process_count() == 1:
        return mine
    return np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(values))


def from_process_0(value):
    """Process 0's int value, on every process: its view of the shared --out decides for all."""
    return int(all_processes(value)[0, 0])


# --- 9. Checkpoints (README: "Checkpoints, resume, faults") -------------------------------------------
# OUT/checkpoints/step_N/: each process's slices (llama.local_slices); meta.json, the commit marker, last.


class Checkpointer:
    """The loop's checkpoints, one at a time: save() copies the slices to host memory and writes them in a
    thread; poll(), every step on every process, shares stop signals and commits a write done everywhere."""

    def __init__(self, out, meta, keep):
        self.out, self.meta, self.keep = out, meta, keep
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.pending = None  # (step, Future) of the write in flight; the Future carries its exception

    def save(self, step, state, wait=False):
        self.poll(wait=True)  # the write before, committed
        slices = llama.local_slices(state)  # in host memory: the step to come donates the state's buffers
        self.pending = step, self.worker.submit(self._write, step, slices)
        say(f"checkpoint {checkpoint_dir(self.out, step)}{'' if wait else ' (writing in the background)'}")
        if wait:
            self.poll(wait=True)
            if main_process():
                remove_uncommitted(self.out)  # the files of the checkpoints pruned by the commit

    def _write(self, step, slices):  # in the worker thread
        if main_process():
            remove_uncommitted(self.out, but=step)  # pruned checkpoints' files, off the training path
        path = os.path.join(checkpoint_dir(self.out, step), f"process_{jax.process_index():05d}.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with llama.replaced(path) as tmp:
            save_file(slices, tmp)

    def poll(self, wait=False):
        """The stop signal that any process got (0: none). A write failed on any process: Stopped on all."""
        step, future = self.pending or (0, None)
        if future and wait:
            future.exception()  # waits for it
        done = not future or future.done()
        flags = all_processes(STOP["signal"], done, bool(future and done and future.exception()))
        if future is None or not flags[:, 1].all():
            return int(flags[:, 0].max())
        self.pending = None
        if flags[:, 2].any():
            error = future.exception()
            why = f": {type(error).__name__}: {error}" if error else ""
            raise Stopped(f"writing checkpoint {checkpoint_dir(self.out, step)} failed on process(es) "
                          f"{flags[:, 2].nonzero()[0].tolist()}{why}. Nothing was committed for step {step}. "
                          f"{what_is_kept(self.out)}")
        if main_process():  # the commit; then pruning: the older ones' meta.json now, their files later
            meta = dict(self.meta, step=step, processes=jax.process_count(), devices=jax.device_count())
            with llama.replaced(os.path.join(checkpoint_dir(self.out, step), "meta.json")) as tmp:
                with open(tmp, "w") as fh:
                    json.dump(meta, fh)
            for old in list_checkpoints(self.out)[:-self.keep]:
                os.remove(os.path.join(checkpoint_dir(self.out, old), "meta.json"))
        return int(flags[:, 0].max())


def checkpoint_dir(out, step):
    return os.path.join(out, "checkpoints", f"step_{step:08d}")


def list_checkpoints(out):
    """Steps of the complete (committed) checkpoints in OUT, oldest first."""
    root = os.path.join(out, "checkpoints")
    return sorted(int(d[5:]) for d in (os.listdir(root) if os.path.isdir(root) else [])
                  if re.fullmatch(r"step_\d{8}", d) and os.path.exists(os.path.join(root, d, "meta.json")))


def remove_uncommitted(out, but=-1):
    """Delete pruned and interrupted checkpoints (no meta.json) but step `but`'s, being written: process 0."""
    root = os.path.join(out, "checkpoints")
    for d in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, d)
        if re.fullmatch(r"step_\d{8}", d) and os.path.isdir(path) and path != checkpoint_dir(out, but) \
                and not os.path.exists(os.path.join(path, "meta.json")):
            shutil.rmtree(path, ignore_errors=True)


def resume_point(out):
    """(step, meta.json, damaged newer steps): the newest whole committed checkpoint, as process 0 sees."""
    step, meta, damaged = 0, None, []
    for s in reversed(list_checkpoints(out)) if main_process() else []:
        file = os.path.join(checkpoint_dir(out, s), "meta.json")
        try:
            with open(file) as fh:
                meta = json.load(fh)
            keys = ("step", "processes", "devices", "config", "model_config", "data_hash", "data_parallel")
            problem = next((f"{file}: no {key!r} in it" for key in keys if key not in meta), "")
            for i in range(0 if problem else meta["processes"]):
                file = os.path.join(checkpoint_dir(out, s), f"process_{i:05d}.safetensors")
                with safe_open(file, framework="numpy"):
                    pass  # reads the header and checks the file's size against it: a cut file fails here
        except Exception as e:  # missing, cut, not JSON, not safetensors: all mean "cannot resume from this"
            problem = f"{file}: {type(e).__name__}: {e}"
        if not problem:
            step = s
            break
        damaged.append((s, problem))
    if from_process_0(bool(damaged) and not step):
        raise InputError(f"--out {out}: every checkpoint there is damaged, none can be resumed: "
                         f"{'; '.join(p for _, p in damaged) or 'see the log of process 0'}. Move them "
                         "away to start afresh.")
    for s, problem in damaged:
        say(f"warning: skipping the damaged checkpoint {checkpoint_dir(out, s)}: {problem}")
    step = from_process_0(step)
    if step and not main_process():  # process 0 checked it
        with open(os.path.join(checkpoint_dir(out, step), "meta.json")) as fh:
            meta = json.load(fh)
    return step, meta, [s for s, _ in damaged]


# --- 10. Hugging Face export, upload and generation (README: "Choices", Export) -----------------------
# The chat template renders Stanford's prompt: the last "user" message as the instruction, "input" the input.

JINJA_FIELDS = {"instruction": "{{ ns.instruction }}", "input": "{{ ns.input }}"}
CHAT_TEMPLATE = ("{%- set ns = namespace(instruction='', input='') -%}{%- for m in messages -%}"
                 "{%- if m['role'] == 'user' %}{% set ns.instruction = m['content'] %}"
                 "{%- elif m['role'] == 'input' %}{% set ns.input = m['content'] %}{% endif -%}{%- endfor -%}"
                 "{{ bos_token }}{% if ns.input %}" + PROMPT_DICT["prompt_input"].format_map(JINJA_FIELDS)
                 + "{% else %}" + PROMPT_DICT["prompt_no_input"].format_map(JINJA_FIELDS) + "{% endif %}")


def export_hf(run, state, path):
    """Every process gathers, process 0 writes. LoRA: the merged model, and `path`-adapter for PEFT."""
    c, mc, lc = run.c, run.mc, run.lc
    weights, adapters = (state["frozen"], state["trained"]) if lc else (state["trained"], None)
    with input_error("tokenizer"):
        tokenizer = dict(tokenizer=llama.tokenizer_file(c.tokenizer or run.model_dir),
                         chat_template=CHAT_TEMPLATE)
    llama.save_hf(path, mc, weights, dtype=jnp.dtype(c.hf_dtype), lora=adapters,
                  lora_scale=lc.scale if lc else 1.0, **tokenizer)
    say(f"exported Hugging Face checkpoint to {path}{' (LoRA merged)' if lc else ''}")
    if lc:
        base = os.path.abspath(c.model) if os.path.isdir(c.model) else c.model
        llama.save_peft(f"{path}-adapter", mc, lc, adapters, base_model=base, **tokenizer)
        say(f"exported PEFT adapter to {path}-adapter")


def respond(model, instruction, input_text="", *, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0):
    """A Hugging Face checkpoint's answer to one instruction through the template, greedy or sampled."""
    if re.fullmatch(r"step_\d{8}", os.path.basename(os.path.normpath(model))) and \
            os.path.exists(os.path.join(model, "meta.json")):
        out = os.path.dirname(os.path.dirname(os.path.abspath(model)))
        raise InputError(f"--model {model}: a training checkpoint; generation takes a Hugging Face export, "
                         f"e.g. {os.path.join(out, 'hf', 'final')} (or DIR/final of the run's "
                         "--hf_save_path)")
    with input_error(f"--model {model}"):
        mc, params = llama.load_hf(model)
    sp = load_tokenizer(llama.resolve_model_path(model))
    ids = [sp.bos_id()] + sp.encode(format_prompt({"instruction": instruction, "input": input_text}))
    if len(ids) >= mc.max_position_embeddings:
        raise InputError(f"the prompt is {len(ids)} tokens: no room left in the model's context of "
                         f"{mc.max_position_embeddings}")
    try:  # the flags of `alpaca.py generate` are llama.generate's arguments, named alike
        out = llama.generate(params, np.array([ids], np.int32), mc, temperature=temperature, top_p=top_p,
                             max_new_tokens=min(max_new_tokens, mc.max_position_embeddings - len(ids)),
                             key=jax.random.PRNGKey(seed), eos_token_id=sp.eos_id())
    except ValueError as e:
        raise InputError(f"--{e}")
    out = [int(t) for t in np.asarray(out)[0]]
    return sp.decode(out[:out.index(sp.eos_id())] if sp.eos_id() in out else out).strip()


def generate_main(argv):
    p = argparse.ArgumentParser(prog="alpaca.py generate", description="Answer an instruction with a Hugging "
                                "Face checkpoint (an export, say) through the Alpaca template.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory or Hub repo id")
    p.add_argument("--instruction", required=True)
    p.add_argument("--input", dest="input_text", metavar="INPUT", default="",
                   help="optional context for the instruction")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: keep this much probability")
    p.add_argument("--seed", type=int, default=0)
    print(respond(**vars(p.parse_args(argv))))  # the flags are respond's arguments
    return 0


# --- 11. main, and --dry_run --------------------------------------------------------------------------


def compile_step(c, mc, lc, mesh, rows, micro_batches):
    """The train step of these flags, compiled for `mesh` (compile-only devices too) from shapes alone."""
    state = sharding.abstract_state(mc, mesh, jnp.dtype(c.param_dtype), lc)
    step = make_step(c, mc, lc, mesh, 1, micro_batches)  # the schedule's length changes no buffer
    return step.lower(state, abstract_batch(mesh, rows, c.seq_len)).compile()


def dry_run(c):
    """--dry_run: the data plan, and XLA's figure for what one device here holds at the peak of a step."""
    check_flags(c)
    _, mc, lc = model_config(c, weights=False)
    mesh = mesh_for(c, mc, lc)
    _, plan, stats = prepare_data(c, mc, c.data_parallel or jax.device_count(), jax.device_count())
    m = compile_step(c, mc, lc, mesh, plan["rows_per_step"], plan["micro_batches"]).memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    limit = c.device_memory_gb * 1e9 or (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    memory = {"devices": mesh.size, "device_kind": jax.devices()[0].device_kind, "bytes_per_device": total,
              "limit_bytes": limit, "fits": total <= limit if limit else None}
    verdict = f": {'fits' if memory['fits'] else 'does NOT fit'} in {limit / 1e9:.2f} GB" if limit else ""
    print(f"{plan_line(stats, mesh.size)}\nmemory: {total / 1e9:.2f} GB per device at the peak of a step "
          f"(XLA's figure for the compiled step){verdict}", file=sys.stderr, flush=True)
    print(json.dumps({**stats, "memory": memory}))
    return 0


def main(argv=None):
    argv, out = sys.argv[1:] if argv is None else list(argv), None
    try:
        if argv[:1] == ["generate"]:
            return generate_main(argv[1:])
        c = parse_config(argv)
        if c.dry_run:
            return dry_run(c)
        init_distributed()
        out = c.out
        return train(c)
    except (InputError, llama.CheckpointError) as e:  # a file we cannot read faithfully names itself
        status, message = 2, str(e)
    except Stopped as e:
        status, message = 1, str(e)
    except KeyboardInterrupt:  # before the loop or after it (the export): Ctrl-C's default
        status, message = 130, f"interrupted. {what_is_kept(out)}"
    except OSError as e:  # a full disk, a read-only or vanished directory: nothing complete is lost
        status, message = 1, f"{e.filename or 'a file'}: {e.strerror or e}. {what_is_kept(out)}"
    except Exception as e:
        if not (jax.distributed.is_initialized() and jax.process_count() > 1):
            raise
        traceback.print_exc()
        status, message = 1, (f"process {jax.process_index()} of {jax.process_count()} stopped: "
                              f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}\nIf another "
                              f"process of this job died or lost its connection, its log says why. Restart "
                              f"all {jax.process_count()} processes with the same command. "
                              f"{what_is_kept(out)}")
    print(f"alpaca.py: error: {message}", file=sys.stderr)
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        # Skip Python's exit, whose jax.distributed handler waits at a shutdown barrier (up to 300 s, then
        # aborts) for every process, dead ones included. Our connections close at once, so the other
        # processes fail at their next collective instead of waiting on us.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def what_is_kept(out):
    """What a stopped run still has in --out, and what the same command does next."""
    kept = list_checkpoints(out) if out else []
    if not kept:
        return "There is no complete checkpoint yet: the same command starts afresh."
    return (f"Every complete checkpoint is kept; the same command resumes from the latest, "
            f"{checkpoint_dir(out, kept[-1])}, and exports once every step is done.")


if __name__ == "__main__":
    sys.exit(main())
