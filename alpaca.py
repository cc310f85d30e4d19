"""Alpaca fine-tuning of Llama in plain JAX: the command line, the data, the training run and its exports.

Stanford Alpaca fine-tunes LLaMA on 52K instruction records: each record becomes a prompt (a fixed
template around the instruction and optional input) followed by the output, and the loss is taken only
on the output and the end-of-sequence token. Stanford and Levanter pad every example to the longest of
its micro-batch or to 512 tokens; Alpaca examples average 127 tokens, so most of the compute goes to
padding. Here examples are *packed*: several whole examples share one row of `seq_len` tokens, with
segment ids and positions that restart per example, so attention never crosses examples and the
result is the same as padding, at a fraction of the token slots. The model is llama.py's; sharding.py
splits it over the devices (FSDP) and writes the train step.

The file reads top to bottom:
  1. Config: every flag, with Stanford Alpaca's recipe as defaults, the presets, and the parser.
  2. Preflight: every check of the flags, and of the flags against config.json, the data and the devices.
  3. Training: train(), the life of a run as a list of phases, then each phase: the step, restore or load,
     the logs, the loop (checkpoints, SIGTERM, divergence), the final export.
  4. Records: reading {instruction, input, output} from .json, .jsonl, .parquet, a URL or a Hub dataset.
  5. Prompts and tokens: the template, SentencePiece, the loss boundary, truncation, a disk cache.
  6. The plan: which examples go into which row of which step, a pure function of (seed, data).
  7. Batches: the [R, T] arrays of step k, or only the rows of this process (multi-host).
  8. Several hosts: joining them, and what each process does.
  9. Checkpoints: written in the background, committed by a marker file, readable on any device layout.
  10. The memory plan: what one device holds at the peak of a step, XLA's figure, before any is rented.
  11. Hugging Face export, upload and generation (`alpaca.py generate`).
  12. main (`--dry_run`: the data plan and the memory plan).

Bad input (flags, data, tokenizer) raises InputError with a message that names the flag, file or
record; main prints it and exits with status 2.
"""

import argparse
import dataclasses
import glob
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import sentencepiece as spm


# ----------------------------------------------------------------------------------------------------
# 1. Config


# Stanford's 52K records, as released: alpaca_data.json at a pinned commit of tatsu-lab/stanford_alpaca. A
# download counts only if its git blob id (sha1 of b"blob <size>\0" + the bytes, what `git hash-object`
# prints) is the one that commit records, so a changed, cut or substituted file is never taken for the data.
ALPACA_DATA_URL = ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/"
                   "761dc5bfbdeeffa89b8bff5d038781a4055f796a/alpaca_data.json")
PINNED_DOWNLOADS = {ALPACA_DATA_URL: "3779ddbc040543ab1834ef216c983d6fcc06cc9a"}  # URL -> git blob id


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    # What to train on.
    model: str = _f("meta-llama/Llama-2-7b-hf", "Hugging Face model: a local directory or a Hub repo id")
    tokenizer: str = _f("", "tokenizer.model file, a directory holding one, or a Hub repo id; '' = --model")
    data: str = _f(ALPACA_DATA_URL, "Alpaca records: a .json list, .jsonl, .parquet, a directory of them, an "
                                    "http(s) URL of a .json/.jsonl file (downloaded once into --cache_dir), or a "
                                    "Hub dataset id (parquet ones need pyarrow); the default is Stanford's "
                                    "alpaca_data.json at a pinned commit, checked by its git blob id")
    cache_dir: str = _f(".cache", "where downloaded data, tokenized data (keyed by data, tokenizer, template, "
                                  "max_len) and --dry_run's memory figures are cached")
    # How much: Stanford trains 3 epochs of 52,002 records at 128 a step, about 1218 steps.
    steps: int = _f(0, "optimizer steps; 0 = as many as --epochs takes")
    epochs: int = _f(3, "passes over the data, each in a fresh order from --seed (used when --steps is 0)")
    batch_size: int = _f(128, "examples per optimizer step (an average when packing: see --seq_len)")
    micro_batch_size: int = _f(0, "rows per forward/backward pass over all devices (gradient accumulation); "
                                  "0 = the whole step in one pass; must divide the rows of a step and be a "
                                  "multiple of the device count. It never changes what a step holds")
    max_len: int = _f(512, "examples are truncated to this many tokens (Stanford's model_max_length)")
    # 2048: ~128 Alpaca examples (mean 127 tokens) fill 8 rows of 2048 at >99% real tokens, one row per
    # device of an 8-chip host; it is Llama's context length and attention is ~8% of a 7B model's FLOPs
    # there. Small models on CPU pay relatively more for attention over long rows: use 512 for those.
    seq_len: int = _f(2048, "tokens per packed row; with --no_pack, every example is padded to this length")
    no_pack: bool = _f(False, "one example per row, padded to --seq_len (what Stanford and Levanter do)")
    data_parallel: int = _f(0, "plan the rows of a step for this many devices (a multiple of it); 0 = the "
                               "devices here, or when resuming, the count the checkpoint's run planned for. "
                               "--dry_run for another machine, or the same plan on fewer devices "
                               "(training needs a multiple of the device count)")
    # Optimizer: AdamW, 3% linear warmup then cosine to 0, as Stanford's Trainer arguments.
    lr: float = _f(2e-5, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.03, "fraction of the steps spent in linear warmup")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = no clipping")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    seed: int = _f(0, "seed of the data order (and of anything random)")
    param_dtype: str = _f("", "dtype of the master parameters and optimizer state; '' = float32, or bfloat16 with "
                              "--lora_rank (then it is the frozen base weights' dtype: the adapters and their AdamW "
                              "state are float32)")
    compute_dtype: str = _f("bfloat16", "dtype of the forward and backward matmuls")
    # LoRA: train low-rank adapters of the decoder's matrices on the frozen base (see sharding.py).
    lora_rank: int = _f(0, "LoRA rank r: train adapters A [in, r], B [r, out] of the --lora_targets matrices, the "
                           "base weights frozen; 0 = full fine-tune. Each export is then both the merged model (e.g. "
                           "OUT/hf/final) and a PEFT adapter (OUT/hf/final-adapter). LoRA wants a higher --lr than "
                           "the full fine-tune's 2e-5 (Levanter and alpaca-lora use 3e-4: --preset alpaca-lora)")
    lora_alpha: float = _f(8.0, "LoRA scale numerator: the update x A B is multiplied by lora_alpha / lora_rank")
    lora_targets: str = _f("q,k,v,o,gate,up,down", "LoRA: comma-separated matrices adapted in every decoder layer: "
                                                   "attention q, k, v, o; MLP gate, up, down")
    no_remat: bool = _f(False, "keep every layer's activations for the backward pass instead of recomputing "
                               "the layer (and re-gathering its weights): faster, but memory grows with depth")
    # Run directory, checkpoints, logs, exports.
    out: str = _f("runs/alpaca", "run directory: checkpoints, metrics.jsonl, HF exports; a rerun resumes from it")
    checkpoint_every: int = _f(200, "steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    log_every: int = _f(10, "steps between progress lines")
    dry_run: bool = _f(False, "read, tokenize and pack the data, compile the train step for the planned devices "
                              "(--data_parallel) to find the memory one device needs, print it and one JSON line "
                              "of statistics, exit (reads only config.json and the tokenizer, never the weights)")
    device_memory_gb: float = _f(0.0, "memory of one device in GB, for --dry_run's memory plan; 0 = the HBM of "
                                      "the TPU here, or the 75%% of a GPU's that JAX takes (XLA_PYTHON_CLIENT_MEM_"
                                      "FRACTION), when known; on CPU a table of common devices")
    hf_save_path: str = _f("", "directory for Hugging Face exports: DIR/step_N every --hf_save_steps, DIR/final "
                               "at the end; '' = OUT/hf")
    hf_save_steps: int = _f(0, "steps between Hugging Face exports; 0 = only at the end")
    hf_upload: str = _f("", "Hub repo id to upload the final export to; '' = no upload")
    hf_dtype: str = _f("bfloat16", "dtype of the exported Hugging Face weights (float32, bfloat16, float16)")
    wandb_project: str = _f("", "log to this Weights & Biases project (needs wandb installed); '' = off")
    peak_tflops: float = _f(0.0, "per-device peak TFLOP/s for the MFU column; 0 = the datasheet bf16 peak of "
                                 "known TPUs/GPUs (none on CPU)")
    sample_instruction: str = _f("", "after training, answer this instruction with the exported model and print it")
    sample_tokens: int = _f(128, "most new tokens of that answer")
    preset: str = _f("", "start from a named set of flags, flags given explicitly still win: 'demo' = "
                        "stories260K on the Alpaca sample in tests/assets, 60 steps on CPU in a few minutes; "
                        "'alpaca-lora' = Levanter's Alpaca-LoRA (rank 8, alpha 8, all seven matrices, lr 3e-4)")

    def __post_init__(self):
        if not self.param_dtype:  # LoRA keeps the frozen base in bfloat16: nothing is added to it, so nothing is lost
            object.__setattr__(self, "param_dtype", "bfloat16" if self.lora_rank else "float32")


class InputError(Exception):
    """Bad flags, data or tokenizer: the message names what to fix. main prints it and exits 2."""


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    return p


# The demo preset: the README's first command. A real (tiny) pretrained Llama, stories260K, fine-tuned on
# 2,000 real Alpaca records, both shipped in tests/assets/, in float32 on whatever devices there are. It
# shows the loss going down, writes the HF export, and answers an instruction. The settings are fixed,
# not derived from the hardware: the same flags give the same run everywhere.
PRESETS = {
    "demo": dict(model="tests/assets/stories260K", data="tests/assets/alpaca/alpaca_sample_2000.json",
                 seq_len=512, max_len=512, batch_size=32, steps=60, lr=1e-3, warmup_ratio=0.05,
                 compute_dtype="float32", hf_dtype="float32", out="runs/demo", log_every=5, checkpoint_every=20,
                 sample_instruction="Give three tips for staying healthy.", sample_tokens=64),
    # Levanter's Alpaca-LoRA (examples/alpaca-lora/alpaca-lora-llama2.yaml and its LoraConfig defaults): rank 8,
    # alpha 8, no dropout, every linear matrix of the decoder, lr 3e-4, no weight decay; with this file's
    # defaults for the rest (Llama-2-7B, 3 epochs of ~128 examples a step, 3% warmup then cosine).
    "alpaca-lora": dict(lora_rank=8, lora_alpha=8.0, lora_targets="q,k,v,o,gate,up,down", lr=3e-4,
                        weight_decay=0.0, out="runs/alpaca-lora"),
}


def parse_config(argv):
    parser = make_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        if preset not in PRESETS:
            raise InputError(f"--preset {preset}: unknown; known presets: {', '.join(PRESETS)}")
        here = os.path.dirname(os.path.abspath(__file__))
        # Paths of a preset are relative to this file, so the demo runs from any directory.
        defaults = {k: (os.path.join(here, v) if k in ("model", "data") else v) for k, v in PRESETS[preset].items()}
        parser.set_defaults(**defaults)
    return Config(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------
# 2. Preflight
#
# Every check of the flags, then of the flags against the model's config.json, the data and the devices, in
# one place and before anything is written or loaded: a run that starts is a run that can finish. The
# library functions below (the plan, the batches, the checkpoints) only assert their own contracts.


def check_flags(c):
    """The flag combinations that cannot work, named by flag, before any work is done."""
    for name in ("batch_size", "max_len", "seq_len"):
        if getattr(c, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(c, name)}")
    if c.seq_len < c.max_len:
        raise InputError(f"--seq_len ({c.seq_len}) must be at least --max_len ({c.max_len}): an example "
                         "is never split across rows")
    if c.steps < 0 or c.epochs < 0 or (c.steps == 0 and c.epochs == 0):
        raise InputError("give a positive --steps or --epochs")
    for name in ("micro_batch_size", "data_parallel", "checkpoint_every", "hf_save_steps"):
        if getattr(c, name) < 0:
            raise InputError(f"--{name} must be >= 0, got {getattr(c, name)}")
    for name in ("log_every", "keep_checkpoints"):
        if getattr(c, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(c, name)}")
    if not 0 <= c.warmup_ratio <= 1:
        raise InputError(f"--warmup_ratio must be in [0, 1], got {c.warmup_ratio}")
    if not c.lr > 0:  # written so that NaN fails too
        raise InputError(f"--lr must be positive, got {c.lr}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise InputError(f"--{name} must be in [0, 1), got {getattr(c, name)}")
    for name in ("eps", "weight_decay", "grad_clip", "device_memory_gb"):
        if not getattr(c, name) >= 0:
            raise InputError(f"--{name} must be >= 0, got {getattr(c, name)}")
    for name in ("param_dtype", "compute_dtype", "hf_dtype"):
        if getattr(c, name) not in ("float32", "bfloat16", "float16"):
            raise InputError(f"--{name} must be float32, bfloat16 or float16, got {getattr(c, name)!r}")
    if c.lora_rank < 0:
        raise InputError(f"--lora_rank must be >= 0 (0 = full fine-tune), got {c.lora_rank}")
    if not c.lora_alpha > 0:
        raise InputError(f"--lora_alpha must be positive, got {c.lora_alpha}")
    lora_targets(c)


def check_generate(a):
    """The flags of `alpaca.py generate`."""
    if a.max_new_tokens < 1:
        raise InputError(f"--max_new_tokens must be at least 1, got {a.max_new_tokens}")
    if a.temperature < 0:
        raise InputError(f"--temperature must be >= 0 (0 = greedy), got {a.temperature}")
    if not 0 < a.top_p <= 1:
        raise InputError(f"--top_p must be in (0, 1], got {a.top_p}")


def answer_room(prompt_ids, mc):
    """How many tokens the model's context leaves for the answer to a prompt; none is an error."""
    context = min(mc.max_position_embeddings, mc.sliding_window or mc.max_position_embeddings)
    if len(prompt_ids) >= context:
        raise InputError(f"the prompt is {len(prompt_ids)} tokens, the model's context is {context}")
    return context - len(prompt_ids)


def lora_targets(c):
    """The --lora_targets names, checked."""
    import llama
    names = [t.strip() for t in c.lora_targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in llama.LORA_TARGETS]
    if unknown or not names:
        raise InputError(f"--lora_targets {c.lora_targets!r}: unknown {unknown or 'empty'}; choose from "
                         f"{','.join(llama.LORA_TARGETS)}")
    return tuple(t for t in llama.LORA_TARGETS if t in names)


def lora_config(c, mc):
    """The llama.LoraConfig of the flags (None for a full fine-tune), checked against the model: the rank may
    not exceed the smallest dimension of a matrix it adapts (then A B could not be low-rank)."""
    import llama
    if not c.lora_rank:
        return None
    lc = llama.LoraConfig(rank=c.lora_rank, alpha=c.lora_alpha, targets=lora_targets(c))
    shapes = llama.lora_shapes(mc, lc)["layers"]
    for t in lc.targets:
        n_in, n_out = shapes[llama.LORA_TARGETS[t]]["a"][1], shapes[llama.LORA_TARGETS[t]]["b"][2]
        if c.lora_rank > min(n_in, n_out):
            raise InputError(f"--lora_rank {c.lora_rank} is larger than the smallest dimension of a matrix it "
                             f"adapts: {t} is [{n_in}, {n_out}] in this model")
    return lc


def model_config(c, weights=True):
    """(model directory, LlamaConfig), checked against the flags. weights=False (--dry_run) reads config.json
    alone, and downloads nothing else of a Hub model; weights=True also checks the safetensors headers."""
    import llama
    try:
        model_dir = llama.resolve_model_path(c.model, allow_patterns=None if weights else ["config.json"])
        # config.json, and with weights the safetensors headers too (no weight is read yet)
        mc = llama.check_checkpoint(model_dir)[0] if weights else llama.read_config(model_dir)
    except (llama.CheckpointError, OSError, ValueError) as e:
        raise InputError(f"--model {c.model}: {e}")
    if c.seq_len > mc.max_position_embeddings:
        raise InputError(f"--seq_len {c.seq_len} is above the model's max_position_embeddings "
                         f"({mc.max_position_embeddings})")
    if mc.sliding_window is not None and c.seq_len > mc.sliding_window:
        raise InputError(f"--seq_len {c.seq_len} is above the model's sliding_window ({mc.sliding_window}), "
                         "which is not implemented")
    lora_config(c, mc)  # the LoRA flags against the model's shapes
    return model_dir, mc


def check_hidden_size(mc, devices):
    """FSDP splits every weight matrix along hidden_size (sharding.py's partition rules)."""
    if mc.hidden_size % devices:
        raise InputError(f"the model's hidden_size ({mc.hidden_size}) cannot be split over {devices} devices")


def step_rows(c, lengths, data_parallel, devices=None):
    """(rows per step, micro-batches per step) of these flags and examples, the rows planned for
    `data_parallel` devices and split over `devices` (default: the same)."""
    devices = devices or data_parallel
    if len(lengths) == 0:
        raise InputError("no examples left to train on: all were dropped (is --max_len shorter than the prompts?)")
    if c.no_pack and c.batch_size % data_parallel:
        raise InputError(f"--batch_size {c.batch_size} with --no_pack (one example per row) must be a multiple "
                         f"of the data-parallel size ({data_parallel})")
    R = choose_rows_per_step(lengths, batch_size=c.batch_size, seq_len=c.seq_len, data_parallel=data_parallel,
                             pack=not c.no_pack)
    m = c.micro_batch_size
    if m and (R % m or m % devices):
        valid = [v for v in range(devices, R + 1, devices) if R % v == 0]
        raise InputError(f"--micro_batch_size {m}: a micro-batch must divide the {R} rows of a step and be a "
                         f"multiple of the {devices} devices; valid here: {valid}")
    return R, micro_batches(R, m, devices)


def prepare_data(c, data_parallel, devices=None):
    """Records -> examples -> plan, as the flags say, with rows planned for `data_parallel` devices and
    split over `devices` (default: the same). Returns (examples, plan, info for the logs)."""
    records = load_records(c.data, c.cache_dir)
    sp = load_tokenizer(c.tokenizer or c.model)
    t0 = time.perf_counter()
    examples, stats, hit = tokenize_cached(records, sp, c.max_len, c.cache_dir)
    seconds = time.perf_counter() - t0
    lengths = example_lengths(examples)
    R, micro = step_rows(c, lengths, data_parallel, devices)
    plan = plan_steps(lengths, seed=c.seed, rows_per_step=R, seq_len=c.seq_len, epochs=c.epochs,
                      steps=c.steps, pack=not c.no_pack, data_parallel=data_parallel)
    info = {**stats, **plan_stats(plan, lengths), "seq_len": c.seq_len, "max_len": c.max_len,
            "data_parallel": data_parallel, "micro_batches": micro,
            "tokenize_seconds": round(seconds, 3), "cache_hit": hit}
    return examples, plan, info


def why_unwritable(directory, probe_name):
    """Why `directory` cannot be written to ('' when it can): made if missing, then a file is created in it."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, probe_name)
        open(probe, "w").close()
        os.remove(probe)
        return ""
    except OSError as e:
        return e.strerror or type(e).__name__


# Flags that change what a run computes: a checkpoint written under other values is refused.
# (--data_parallel is checked apart: 0 means "as recorded in the checkpoint".)
RESUME_KEYS = ("model", "data", "tokenizer", "max_len", "seq_len", "no_pack", "batch_size", "micro_batch_size",
               "steps", "epochs", "lr", "weight_decay", "warmup_ratio", "grad_clip", "beta1", "beta2", "eps",
               "seed", "param_dtype", "compute_dtype", "lora_rank", "lora_alpha", "lora_targets")


def check_resumable(resumed, c, meta, where):
    """Refuse a checkpoint (`resumed`: its meta.json, at `where`) whose run computed something else than this one
    (`meta`: what this run's checkpoints record), naming the settings that differ."""
    saved = {k: resumed["config"].get(k, Config.__dataclass_fields__[k].default) for k in RESUME_KEYS}
    if bool(saved["lora_rank"]) != bool(c.lora_rank):
        kind = {False: "a full fine-tune (all weights)", True: "LoRA (adapters only)"}
        raise InputError(f"{where} is a checkpoint of {kind[bool(saved['lora_rank'])]}, and this run is "
                         f"{kind[bool(c.lora_rank)]} (--lora_rank {c.lora_rank}): one cannot resume the other. Use "
                         f"--lora_rank {saved['lora_rank']} to resume, or another --out to start afresh.")
    diffs = [f"--{k} {saved[k]!r} (this run: {getattr(c, k)!r})" for k in RESUME_KEYS if saved[k] != getattr(c, k)]
    if resumed["model_config"] != meta["model_config"]:
        diffs.append("the model's config.json")
    if resumed.get("data_hash") != meta["data_hash"]:
        diffs.append("the data (its tokenized examples differ, although --data may name the same file)")
    if resumed.get("base_fingerprint") != meta.get("base_fingerprint"):
        diffs.append("the base model's weights (--model holds other weights than those the adapters were trained on)")
    if c.data_parallel and c.data_parallel != resumed.get("data_parallel"):
        diffs.append(f"--data_parallel {resumed.get('data_parallel')} (this run: {c.data_parallel})")
    if diffs:
        raise InputError(f"{where} was written by a different run: " + "; ".join(diffs) +
                         ". Use the same settings to resume, or another --out to start afresh.")


@dataclass(frozen=True)
class Run:
    """What preflight derived from the flags, the model's config.json, the data and the devices."""
    c: Config
    model_dir: str
    mc: object  # llama.LlamaConfig
    lc: object  # llama.LoraConfig, or None for a full fine-tune
    mesh: object  # the devices' jax.sharding.Mesh
    examples: dict  # tokenize_records' examples
    lengths: np.ndarray  # their lengths
    plan: dict  # plan_steps' plan
    info: dict  # data statistics, for the logs
    meta: dict  # what each checkpoint's meta.json records of this run
    start: int  # the step of the checkpoint to resume from; 0 = a fresh start
    resumed: dict  # that checkpoint's meta.json, or None
    t_launch: float  # time.time() at the start


def preflight(c):
    """Every check of the flags against config.json, the data and the devices, and of the checkpoint to resume
    from, before anything is loaded or written (probes of --out and --hf_save_path aside). Returns the Run."""
    import jax
    import sharding
    t_launch, devices = time.time(), jax.device_count()
    model_dir, mc = model_config(c)
    lc = lora_config(c, mc)
    if c.data_parallel % devices:
        raise InputError(f"--data_parallel {c.data_parallel}: training splits the rows of a step over all "
                         f"{devices} devices, so it must be 0 or a multiple of {devices}")
    check_hidden_size(mc, devices)
    mesh = sharding.make_mesh()
    start, recorded = resume_point(c.out)  # a resumed run keeps the data plan it started with
    planned = c.data_parallel or recorded or devices
    examples, plan, info = prepare_data(c, planned, devices=devices)
    R = plan["rows_per_step"]
    if R % devices:
        raise InputError(f"--out {c.out}: the checkpoint of step {start} comes from a run whose steps have {R} rows "
                         f"(planned for --data_parallel {planned}): they cannot be split over {devices} devices; "
                         f"resume on a device count that divides {R}")
    if examples["tokens"].max() >= mc.vocab_size:
        raise InputError(f"--tokenizer {c.tokenizer or c.model}: token id {int(examples['tokens'].max())} is outside "
                         f"the model's vocabulary of {mc.vocab_size}: the tokenizer does not belong to --model")
    problem = why_unwritable(c.out, f".write-test-{jax.process_index()}")
    if problem:
        raise InputError(f"--out {c.out}: not a writable directory ({problem})")
    problem = why_unwritable(c.hf_save_path, ".write-test") if c.hf_save_path and jax.process_index() == 0 else ""
    if agree(bool(problem)):  # only process 0 writes exports; every process stops with its message
        raise InputError(f"--hf_save_path {c.hf_save_path}: not a writable directory on process 0 "
                         f"({problem or 'see its log'})")
    if agree(bool(c.wandb_project) and jax.process_index() == 0 and importlib.util.find_spec("wandb") is None):
        raise InputError("--wandb_project needs wandb on process 0: pip install wandb")
    lengths = example_lengths(examples)
    meta = {"config": dataclasses.asdict(c), "model_config": dataclasses.asdict(mc),
            "data_examples": int(len(lengths)), "data_tokens": int(lengths.sum()), "data_hash": data_hash(examples),
            "data_parallel": planned}
    if lc:
        meta["base_fingerprint"] = weights_fingerprint(model_dir)
    check_shared_out(c.out)
    resumed = read_checkpoint_meta(c.out, start) if start else None
    if start:
        check_resumable(resumed, c, meta, checkpoint_dir(c.out, start))
    return Run(c, model_dir, mc, lc, mesh, examples, lengths, plan, info, meta, start, resumed, t_launch)


# ----------------------------------------------------------------------------------------------------
# 3. Training
#
# train() is the whole life of a run, one named phase a line; the functions after it are the phases, in
# that order. What the flags, the data or the devices get wrong, preflight finds before a weight is read.


def train(c):
    import jax
    say = (lambda *a: print(*a, flush=True)) if jax.process_index() == 0 else (lambda *a: None)
    run = preflight(c)  # every check of flags x config.json x data x devices; nothing written yet
    report_plan(run, say)  # the data line and its warnings
    step = make_step(c, run.mc, run.lc, run.mesh, run.plan["steps"], run.info["micro_batches"])
    state = restore_or_load(run, say)  # the latest committed checkpoint, or the HF weights (+ new LoRA adapters)
    logs = open_logs(run)  # metrics.jsonl cut back to the checkpoint, wandb
    preempted, state = train_loop(run, step, state, logs, say)  # steps, logs, checkpoints, SIGTERM, divergence
    if preempted:
        return 143  # a supervisor restarts the run, which resumes from the checkpoint just written
    return finish(run, state, say)  # the HF (+ PEFT) export, upload, sample


def report_plan(run, say):
    c, info, plan = run.c, run.info, run.plan
    R, T, devices = plan["rows_per_step"], plan["seq_len"], run.mesh.size
    say(f"data: {info['examples']} examples ({info['dropped']} dropped), {plan['steps']} steps of {R} rows x {T} "
        f"tokens, ~{info['examples_per_step']} examples/step, {info['packing_efficiency']:.1%} of token slots "
        f"real, {info['micro_batches']} micro-batch(es), {devices} device(s)")
    if not c.no_pack and abs(info["examples_per_step"] - c.batch_size) > 0.25 * c.batch_size:
        # The rows of a step are a multiple of the device count: with many devices, long rows overshoot.
        say(f"warning: a step holds ~{info['examples_per_step']:.0f} examples, not --batch_size {c.batch_size}: "
            f"{R} rows (a multiple of {devices} devices) of --seq_len {T}; a shorter --seq_len gets closer")
    if c.param_dtype != "float32" and not run.lc:
        say(f"warning: --param_dtype {c.param_dtype} keeps the master weights in {c.param_dtype}: an update smaller "
            f"than ~1/256 of a weight is rounded away (at lr {c.lr:g} most of them are). Stanford's recipe and the "
            "default keep float32; use this only when memory forces it")


def adamw_config(c, steps):
    """The optimizer of these flags over a run of `steps` steps (warmup: HF's ceil of the ratio)."""
    import sharding
    return sharding.AdamWConfig(lr=c.lr, b1=c.beta1, b2=c.beta2, eps=c.eps, weight_decay=c.weight_decay,
                                grad_clip=c.grad_clip, warmup_steps=math.ceil(c.warmup_ratio * steps),
                                total_steps=steps)


def make_step(c, mc, lc, mesh, steps, micro):
    """The train step of these flags: what train() runs and what the memory plan compiles."""
    import jax.numpy as jnp
    import sharding
    return sharding.make_train_step(mc, mesh, adamw_config(c, steps), compute_dtype=jnp.dtype(c.compute_dtype),
                                    num_micro_batches=micro, remat=not c.no_remat, lora=lc)


def restore_or_load(run, say):
    """The training state, a dict: "params" (or with LoRA "lora", the adapters, and "base", the frozen weights)
    and "opt_state". Restored from the latest committed checkpoint, or fresh from the Hugging Face weights."""
    import jax
    import llama
    import sharding
    c, mc, lc, start, steps = run.c, run.mc, run.lc, run.start, run.plan["steps"]
    if jax.process_index() == 0:
        remove_uncommitted(c.out)  # what a crash left half-written
    trained = "lora" if lc else "params"
    dtype = jax.numpy.dtype(c.param_dtype)
    params, like, opt_state, _ = abstract_train_inputs(mc, run.mesh, dtype, run.plan["rows_per_step"],
                                                       run.plan["seq_len"], lc)
    state = {}
    if start:
        state = load_checkpoint(c.out, start, {trained: like, "opt_state": opt_state})
        say(f"resuming from {checkpoint_dir(c.out, start)} (step {start} of {steps}, written by "
            f"{run.resumed['processes']} process(es) x {run.resumed['devices']} devices)")
    if lc or not start:  # LoRA's checkpoints never hold the (frozen) base weights
        say(f"loading {c.model} {'(frozen) ' if lc else ''}...")
        shardings = jax.tree.map(lambda p: p.sharding, params)
        state["base" if lc else "params"] = llama.load_hf(run.model_dir, dtype=dtype, shardings=shardings)[1]
    if not start:
        if lc:
            state["lora"] = sharding.init_lora_params(mc, lc, jax.random.key(c.seed), run.mesh)
        state["opt_state"] = sharding.init_opt_state(state[trained])
    if lc:
        say(lora_summary(lc, mc, c.param_dtype))
    if start >= steps:
        say(f"all {steps} steps are done")
    return state


def lora_summary(lc, mc, param_dtype):
    import jax
    import llama

    def count(shapes):
        return sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))

    n, total = count(llama.lora_shapes(mc, lc)), count(llama.param_shapes(mc))
    return (f"LoRA: rank {lc.rank}, alpha {lc.alpha:g} (scale {lc.scale:g}) on {','.join(lc.targets)}: {n:,} "
            f"trainable parameters ({n / total:.2%} of {total:,}); the base weights are frozen in {param_dtype}")


def open_logs(run):
    """The loop's log book: metrics.jsonl without what a killed run logged past its checkpoint, wandb if asked
    (both process 0's), and the counters of the steps since the last progress line."""
    import jax
    c, main_process = run.c, jax.process_index() == 0
    path = os.path.join(c.out, "metrics.jsonl")
    if main_process and os.path.exists(path):
        with open(path) as fh:
            kept = [line for line in fh if _logged_step(line) <= run.start]
        with _replaced(path, "w") as fh:
            fh.writelines(kept)
    wandb = None
    if c.wandb_project and main_process:
        import wandb  # preflight found it
        wandb.init(project=c.wandb_project, config=dataclasses.asdict(c), resume="allow")
    return {"path": path if main_process else None, "wandb": wandb,
            "peak": peak_tflops(jax.devices()[0], c.peak_tflops), "t_window": time.time(), "tokens": 0, "flops": 0.0,
            "last_logged": run.start, "step_times": []}


def _logged_step(line):
    """The step of a metrics.jsonl line; a line cut short by a kill counts as past every checkpoint."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return sys.maxsize


class _Preempted:  # a flag the SIGTERM handler sets; the loop checkpoints and exits at the next step
    requested = False


class TrainingDiverged(Exception):
    """A non-finite loss or gradient norm: the run stops, keeping the last good checkpoint."""


def train_loop(run, step_fn, state, logs, say):
    """Steps run.start .. the last: each runs on the batch the host built during the one before, then logs and
    checkpoints. Returns (whether a SIGTERM stopped it, the state)."""
    import jax
    import sharding
    c, plan, meta, keep = run.c, run.plan, run.meta, run.c.keep_checkpoints
    R, T, steps = plan["rows_per_step"], plan["seq_len"], plan["steps"]
    signal.signal(signal.SIGTERM, lambda *_: setattr(_Preempted, "requested", True))
    batch_sharding = sharding.batch_sharding(run.mesh)
    rows = process_rows(batch_sharding, R, T)

    def batch_of(k):
        return global_batch(process_batch(run.examples, plan, k, rows), batch_sharding, R, T)

    trained = "lora" if run.lc else "params"
    base = (state["base"],) if run.lc else ()  # LoRA: the frozen weights are an argument of the step, never changed
    batch = batch_of(run.start) if run.start < steps else None
    pending = None  # the checkpoint being written in the background, if any
    for k in range(run.start, steps):
        t0 = time.time()
        state[trained], state["opt_state"], m = step_fn(state[trained], state["opt_state"], batch, *base)
        batch = batch_of(k + 1) if k + 1 < steps else None  # the host builds the next batch meanwhile
        m = {key: float(v) for key, v in jax.device_get(m).items()}
        if k == run.start:
            say(f"first step done {time.time() - run.t_launch:.1f}s after start (includes compilation)")
        else:
            logs["step_times"].append(time.time() - t0)
        if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
            finish_checkpoint(pending, c.out, meta, keep)  # the last good one
            raise TrainingDiverged(f"step {k + 1}: loss {m['loss']}, grad_norm {m['grad_norm']}: training diverged "
                                   f"(lower --lr?). The last good checkpoint is {latest_checkpoint(c.out)}; nothing "
                                   "was written for this step.")
        step = k + 1
        log_step(run, logs, k, m, say)
        saved = {trained: state[trained], "opt_state": state["opt_state"]}  # LoRA: never the frozen base
        pending, preempted = checkpoint_after_step(pending, c, step, steps, saved, meta, say)
        if preempted:
            say(f"SIGTERM: checkpoint written at step {step}; exiting so that a supervisor restarts the run")
            return True, state
        if c.hf_save_steps and step % c.hf_save_steps == 0 and step < steps:
            pending = finish_checkpoint(pending, c.out, meta, keep)[0]  # host memory: one at a time
            export_hf(run, state, os.path.join(hf_root(c), f"step_{step:08d}"), say)
    return False, state


# MFU: model FLOPs (llama.train_flops) over the datasheet peak.
PEAK_TFLOPS = {  # dense bf16 per jax device, from the datasheets
    "TPU v3": 61.5, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "A100": 312.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0,
}


def peak_tflops(device, override):
    return override or by_device_kind(PEAK_TFLOPS, device)


def by_device_kind(table, device):
    """The value of the longest key of `table` found in the device's kind ("TPU v5 lite" before "TPU v5")."""
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in sorted(table.items(), key=lambda kv: -len(kv[0])) if k in kind), None)


def log_step(run, logs, k, m, say):
    """Count the tokens and FLOPs of step k (0-based); every --log_every steps and at the end, a progress line,
    a metrics.jsonl record and a wandb point for the steps since the last one."""
    import jax
    import llama
    plan, step, steps, R = run.plan, k + 1, run.plan["steps"], run.plan["rows_per_step"]
    lens = run.lengths[plan["order"][plan["row_start"][k * R]:plan["row_start"][(k + 1) * R]]]
    logs["tokens"] += int(lens.sum())
    logs["flops"] += llama.train_flops(run.mc, lens, frozen_weights=bool(run.lc))
    if step % run.c.log_every and step != steps:
        return
    now = time.time()
    dt = max(now - logs["t_window"], 1e-9)
    times = logs["step_times"]
    per_step = float(np.median(times[-50:])) if times else dt / max(1, step - logs["last_logged"])
    tflops = logs["flops"] / dt / jax.device_count() / 1e12
    rec = {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
           "loss_tokens": int(m["n_tokens"]), "tokens_per_s": logs["tokens"] / dt,
           "tflops_per_device": tflops, "mfu": tflops / logs["peak"] if logs["peak"] else None,
           "eta_s": per_step * (steps - step), "elapsed_s": now - run.t_launch}
    mfu = f"  mfu {rec['mfu']:.1%}" if rec["mfu"] is not None else ""
    eta = time.strftime("%H:%M:%S", time.gmtime(rec["eta_s"])) if rec["eta_s"] < 86400 * 30 else "?"
    say(f"step {step}/{steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.3g}  grad_norm {rec['grad_norm']:.3f}  "
        f"tokens/s {rec['tokens_per_s']:,.0f}  {tflops:.3g} TFLOP/s/device{mfu}  eta {eta}")
    if logs["path"]:
        with open(logs["path"], "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if logs["wandb"]:
            logs["wandb"].log(rec, step=step)
    logs.update(t_window=now, tokens=0, flops=0.0, last_logged=step)


def finish(run, state, say):
    """After the last step: the final Hugging Face export (and PEFT adapter), then process 0 alone uploads it
    and answers --sample_instruction with it. Returns the exit status."""
    import jax
    c, main_process = run.c, jax.process_index() == 0
    final = os.path.join(hf_root(c), "final")
    export_hf(run, state, final, say)
    if jax.process_count() > 1:
        # What is left (upload, sample) is process 0's alone, on its own devices. Leave the distributed
        # system together now: at exit, the others would wait for process 0 at jax.distributed's shutdown
        # barrier, which gives up after 300 s (an upload of 13 GB takes longer) and aborts every process.
        jax.distributed.shutdown()
    status = 0
    if c.hf_upload and main_process:
        status = upload_hf(final, c.hf_upload, say)
    if c.sample_instruction and main_process:
        say(f"\n### Instruction:\n{c.sample_instruction}\n\n### Response (the fine-tuned model, greedy):")
        say(respond(final, c.sample_instruction, "", max_new_tokens=c.sample_tokens))
    return status


# ----------------------------------------------------------------------------------------------------
# 4. Records


def load_records(source, cache_dir=".cache"):
    """Alpaca records [{instruction, input, output}] from a file, a directory of files, an http(s) URL of a
    .json/.jsonl file (downloaded into cache_dir), or a Hub dataset.

    `input` may be missing (= ""); every present field must be a string. Errors name the file and the
    line (.jsonl, malformed .json) or the record number (0-based index in the file's list).
    """
    if source.startswith(("http://", "https://")):
        files = [download(source, cache_dir)]
    elif os.path.isdir(source):
        files = _data_files(source)
    elif os.path.isfile(source):
        files = [source]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.endswith((".json", ".jsonl", ".parquet")):
        files = _data_files(_download_dataset(source))
    else:
        raise InputError(f"--data {source}: no such file or directory")
    if not files:
        raise InputError(f"--data {source}: no .json, .jsonl or .parquet files found")
    try:
        records = [r for f in files for r in _read_file(f)]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--data {source}: cannot read ({type(e).__name__}: {e})")
    if not records:
        raise InputError(f"--data {source}: the data set is empty")
    return records


def _data_files(directory):
    found = [f for ext in ("json", "jsonl", "parquet")
             for f in glob.glob(os.path.join(directory, "**", f"*.{ext}"), recursive=True)]
    return sorted(f for f in found if not os.path.basename(f).startswith("."))


def git_blob_id(path):
    """What `git hash-object` prints for the file: sha1 of b"blob <size>\\0" followed by its bytes."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, cache_dir):
    """The local copy of a .json/.jsonl URL in cache_dir/downloads, fetched only when missing. The bytes go
    to a temporary file that becomes the cache entry (one rename) only once complete, and, for a URL in
    PINNED_DOWNLOADS, only if its git blob id is the pinned one: a failed, cut or wrong download leaves
    nothing that a later run would read."""
    import urllib.parse
    import urllib.request
    ext = os.path.splitext(urllib.parse.urlparse(url).path)[1]
    if ext not in (".json", ".jsonl"):
        raise InputError(f"--data {url}: a URL must name a .json or .jsonl file")
    folder = os.path.join(cache_dir, "downloads")
    path = os.path.join(folder, hashlib.sha256(url.encode()).hexdigest()[:20] + ext)
    if os.path.exists(path):
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".download-", suffix=".part")
    except OSError as e:
        raise InputError(f"--cache_dir {cache_dir}: cannot write the download of {url} there ({e})")
    print(f"downloading {url} ...", file=sys.stderr, flush=True)
    try:
        with os.fdopen(fd, "wb") as fh, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, fh, 1 << 20)
            size, expected = fh.tell(), response.headers.get("Content-Length")
        if expected is not None and size != int(expected):
            raise InputError(f"--data {url}: the download stopped after {size} of {expected} bytes")
        blob = git_blob_id(tmp)
        if url in PINNED_DOWNLOADS and blob != PINNED_DOWNLOADS[url]:
            raise InputError(f"--data {url}: the downloaded file ({size} bytes) has git blob id {blob}, not the "
                             f"pinned {PINNED_DOWNLOADS[url]}: not the file this URL should serve")
        os.replace(tmp, path)
        return path
    except InputError:
        raise
    except Exception as e:  # HTTP errors, resets, timeouts, a body cut short: all mean "no data from here"
        raise InputError(f"--data {url}: the download failed ({type(e).__name__}: {e})")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _download_dataset(repo_id):
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.json", "*.jsonl", "*.parquet"])
    except Exception as e:  # offline, unknown repo, gated: all mean the same to the user
        raise InputError(f"--data {repo_id}: cannot download this Hub dataset ({type(e).__name__}: {e})")


def _read_file(path):
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                             "or give a .json / .jsonl file")
        rows = pq.read_table(path).to_pylist()
    elif path.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}: line {n}: malformed JSON ({e.msg})")
        return [_check_record(r, path, f"line {n}") for n, r in rows]
    else:
        try:
            with open(path, encoding="utf-8") as fh:
                rows = json.load(fh)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {e.lineno} column {e.colno}: malformed JSON ({e.msg})")
        if not isinstance(rows, list):
            raise InputError(f"{path}: expected a JSON list of records, got a {type(rows).__name__}")
    return [_check_record(r, path, f"record {i}") for i, r in enumerate(rows)]


def _check_record(r, path, where):
    if not isinstance(r, dict):
        raise InputError(f"{path}: {where}: expected an object with instruction/input/output, "
                         f"got {type(r).__name__}")
    for key in ("instruction", "output"):
        if key not in r:
            raise InputError(f"{path}: {where}: missing field '{key}'")
    for key in ("instruction", "input", "output"):
        if key in r and not isinstance(r[key], str):
            raise InputError(f"{path}: {where}: field '{key}' is {type(r[key]).__name__}, expected a string")
    return {"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}


# ----------------------------------------------------------------------------------------------------
# 5. Prompts and tokens

# Stanford Alpaca's PROMPT_DICT (train.py), character for character.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def format_prompt(record):
    key = "prompt_input" if record.get("input", "") != "" else "prompt_no_input"
    return PROMPT_DICT[key].format_map(record)


def tokenizer_path(path):
    """The tokenizer.model file of a file path, a directory holding one, or a Hub model id (then only
    tokenizer.model is downloaded, into the Hugging Face cache)."""
    if os.path.isdir(path):
        file = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(file):
            raise InputError(f"tokenizer: no tokenizer.model in {path}")
        return file
    if os.path.isfile(path):
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        from huggingface_hub import hf_hub_download
        try:
            return hf_hub_download(path, "tokenizer.model")
        except Exception as e:
            raise InputError(f"tokenizer: cannot download tokenizer.model of {path} ({type(e).__name__}: {e})")
    raise InputError(f"tokenizer: no such file or directory: {path}")


def load_tokenizer(path):
    """A SentencePiece processor from what tokenizer_path accepts."""
    file = tokenizer_path(path)
    try:
        sp = spm.SentencePieceProcessor(model_file=file)
    except Exception as e:
        raise InputError(f"tokenizer: {file} is not a SentencePiece model ({e})")
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise InputError(f"tokenizer: {file} defines no BOS or EOS token")
    return sp


# The loss boundary. Stanford tokenizes prompt + output as one text and masks the first len(prompt ids)
# tokens. For ~3% of Alpaca the output starts with "-" and joint tokenization merges "Response:" + "-"
# into one token ":-", so their boundary falls inside a token (stanford_alpaca PR #229) and the model is
# trained on a prompt it never sees at inference. We keep the boundary exact instead: the prompt is
# encoded alone, exactly as a user's prompt is at inference, and the output as a continuation of that text,
# i.e. without SentencePiece's dummy-prefix "▁" on its first word. Wherever no token straddles the
# boundary (97% of records) this equals Stanford's joint ids token for token (checked on all 52,002).
# SentencePiece has no per-call switch for the dummy prefix, so we load a copy of the model with
# normalizer_spec.add_dummy_prefix = false, edited in the serialized protobuf (no protobuf dependency).


def _continuation_tokenizer(sp):
    def varint(b, i):
        x = shift = 0
        while True:
            x, shift, i = x | (b[i] & 0x7F) << shift, shift + 7, i + 1
            if b[i - 1] < 0x80:
                return x, i

    def put_varint(x):
        out = bytearray()
        while x > 0x7F:
            out.append(x & 0x7F | 0x80)
            x >>= 7
        return bytes(out + bytes([x]))

    # ModelProto's fields are all length-delimited messages; field 3 is normalizer_spec, where field 3 is
    # add_dummy_prefix (bool). A scalar field given twice takes its last value, so appending 0x18 0x00
    # (field 3, varint, false) to the normalizer's bytes turns the dummy prefix off.
    proto, out, i = sp.serialized_model_proto(), bytearray(), 0
    while i < len(proto):
        tag, j = varint(proto, i)
        size, k = varint(proto, j)
        body = proto[k:k + size] + (b"\x18\x00" if tag == (3 << 3 | 2) else b"")
        out += put_varint(tag) + put_varint(len(body)) + body
        i = k + size
    return spm.SentencePieceProcessor(model_proto=bytes(out))


def tokenize_records(records, sp, max_len):
    """Examples and statistics. examples is a ragged set of int32 token sequences, one per kept record:
       tokens     int32[sum of lengths]  BOS + prompt + output + EOS of every example, concatenated
       offsets    int64[N + 1]           example i is tokens[offsets[i]:offsets[i + 1]]
       loss_start int32[N]               index in the example of the first output token (1 + prompt ids)
       record     int32[N]               index of the example's record in `records`
    Truncation keeps the first max_len tokens; an example with no output token or EOS left is dropped.
    """
    prompts = [format_prompt(r) for r in records]
    prompt_ids = sp.encode(prompts, num_threads=os.cpu_count())
    output_ids = _continuation_tokenizer(sp).encode([r["output"] for r in records], num_threads=os.cpu_count())
    bos, eos, seqs, loss_start, kept, truncated = [sp.bos_id()], [sp.eos_id()], [], [], [], 0
    for i, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        ids = bos + p + o + eos
        truncated += len(ids) > max_len
        ids, start = ids[:max_len], 1 + len(p)
        if start < len(ids):  # else the output is cut entirely: nothing to learn from this record
            seqs.append(ids)
            loss_start.append(start)
            kept.append(i)
    lengths = np.array([len(s) for s in seqs], np.int64)
    examples = {
        "tokens": np.fromiter(itertools.chain.from_iterable(seqs), np.int32, int(lengths.sum())),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "loss_start": np.array(loss_start, np.int32),
        "record": np.array(kept, np.int32),
    }
    stats = {"records": len(records), "examples": len(seqs), "dropped": len(records) - len(seqs),
             "truncated": truncated, "tokens": int(lengths.sum()),
             "loss_tokens": int((lengths - examples["loss_start"]).sum())}
    return examples, stats


def example_lengths(examples):
    return np.diff(examples["offsets"])


CACHE_VERSION = 1  # bump when tokenize_records changes what it produces


def tokenize_cached(records, sp, max_len, cache_dir):
    """tokenize_records through a cache file named by a hash of everything the result depends on.
    Returns (examples, stats, cache_hit). The file is written under a temporary name and renamed, so a
    crash never leaves a half-written cache; an unreadable one is recomputed."""
    h = hashlib.sha256()
    for part in (str(CACHE_VERSION), json.dumps(PROMPT_DICT, sort_keys=True), str(max_len),
                 json.dumps(records, ensure_ascii=False, separators=(",", ":"))):
        h.update(part.encode("utf-8") + b"\0")
    h.update(sp.serialized_model_proto())
    path = os.path.join(cache_dir, f"alpaca-tokens-{h.hexdigest()[:20]}.npz")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                examples = {k: z[k] for k in ("tokens", "offsets", "loss_start", "record")}
                return examples, json.loads(str(z["stats"])), True
        except Exception:
            pass  # unreadable: recompute and overwrite
    examples, stats = tokenize_records(records, sp, max_len)
    try:  # every host of a pod may write the same file at once: the rename keeps that safe
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".npz")
    except OSError as e:
        raise InputError(f"--cache_dir {cache_dir}: cannot write the tokenization cache ({e})")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, stats=np.array(json.dumps(stats)), **examples)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return examples, stats, False


# ----------------------------------------------------------------------------------------------------
# 6. The plan
#
# Packing scheme: a token budget per step, fixed row count, greedy first-fit with look-ahead.
# Every step has R rows of T = seq_len tokens (R fixed for the run, a multiple of the data-parallel size
# and of the micro-batch count, so shapes never change and nothing recompiles). R is chosen from the data
# so that a full step holds about batch_size examples on average: R ~ batch_size * mean length / T.
# Each epoch shuffles the examples with its own seed (seed, epoch). A step takes the examples waiting in
# a window (the oldest first, then the next ones of the shuffled stream, LOOKAHEAD in all) and puts each
# into the first row where it still fits; those that fit nowhere wait for the next step. The oldest
# waiting example always fits (a step starts with empty rows and max_len <= T), so no example waits
# long, none is split across rows, and each is used exactly once per epoch. The last step of an epoch
# may be partly empty; epochs are never mixed in one step. The alternative, exactly 128 examples per
# step with R from the fullest step, wastes the slack of every less full step.
# Measured on the 52,002 records, LLaMA tokenizer, max_len 512, batch_size 128, 3 epochs (`python alpaca.py
# --dry_run --data alpaca_data.json --tokenizer tokenizer.model --data_parallel 8 --seq_len T`):
#   T = 4096: 4 rows, 99.6% real tokens    T = 2048: 8 rows, 99.1%, 128.1 examples a step, 406 steps an epoch
#   T = 1024: 16 rows, 98.3%               T = 512: 32 rows, 96.4%    (padding every example to 512: 24.7%)
# A look-ahead of 128 instead of 512 gives 97.1% at 2048. The whole plan takes ~0.4 s at start-up, so the
# batch of step k is a pure function of (seed, k, data): a resumed run needs no replay.

LOOKAHEAD = 512


def choose_rows_per_step(lengths, *, batch_size, seq_len, data_parallel=1, pack=True):
    """R, the fixed number of rows of a step: about batch_size examples per step, rounded to a multiple
    of the data-parallel size (every device gets the same number of rows). Gradient accumulation does not
    change R: --micro_batch_size only splits it (micro_batches below)."""
    if len(lengths) == 0 or (not pack and batch_size % data_parallel):
        raise ValueError(f"no examples, or {batch_size} rows that {data_parallel} devices do not divide")
    if not pack:
        return batch_size
    rows = batch_size * float(np.mean(lengths)) / (seq_len * 0.99)
    return data_parallel * max(1, round(rows / data_parallel))


def micro_batches(rows, micro_batch_size, devices):
    """How many forward/backward passes a step of `rows` rows takes: rows / micro_batch_size, where a
    micro-batch must divide the step and give every device the same number of rows."""
    if not micro_batch_size:
        return 1
    if rows % micro_batch_size or micro_batch_size % devices:
        raise ValueError(f"micro-batches of {micro_batch_size} rows do not split {rows} rows over {devices} devices")
    return rows // micro_batch_size


def plan_steps(lengths, *, seed, rows_per_step, seq_len, epochs=0, steps=0, pack=True, data_parallel=1):
    """Which examples go into which row of which step, for `steps` steps (or `epochs` epochs if steps=0):
       order      int32[M]                example ids in row order: step by step, row by row
       row_start  int64[steps * R + 1]    row r of step k holds order[row_start[k*R+r] : row_start[k*R+r+1]]
       epoch      int32[steps]            the epoch of each step
    plus the ints steps, rows_per_step, seq_len, steps_per_epoch."""
    lengths = np.asarray(lengths)
    R, T = rows_per_step, seq_len
    if R % data_parallel or len(lengths) == 0 or lengths.max() > T:
        raise ValueError(f"rows per step ({R}) must be a multiple of the data-parallel size ({data_parallel}), and "
                         f"there must be examples, none longer than a row of {T} tokens")
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
    """Rows of one epoch, R per step, by greedy first-fit over a look-ahead window (see above)."""
    out, window, next_ = [], [], 0
    while window or next_ < len(perm):
        take = perm[next_:next_ + LOOKAHEAD - len(window)]
        window, next_ = window + [int(i) for i in take], next_ + len(take)
        free, rows, waiting = [T] * R, [[] for _ in range(R)], []
        most_free = T
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
    used = np.asarray(lengths)[plan["order"]].sum()
    return {"steps": plan["steps"], "steps_per_epoch": plan["steps_per_epoch"],
            "rows_per_step": plan["rows_per_step"],
            "examples_per_step": round(len(plan["order"]) / plan["steps"], 2),
            "packing_efficiency": round(float(used) / (plan["steps"] * plan["rows_per_step"] * plan["seq_len"]), 4)}


# ----------------------------------------------------------------------------------------------------
# 7. Batches
#
# A batch is five int32/float32 arrays of shape [R, T] (rows, time):
#   tokens       the input tokens; 0 on padding
#   targets      the token each position must predict: tokens[r, t + 1] within the same example, else 0
#   loss_mask    1.0 where targets[r, t] is an output token or the EOS of the example, else 0.0
#   segment_ids  1, 2, 3, ... for the examples of a row, 0 for padding: attention stays within a segment
#   positions    0, 1, 2, ... restarting at each example's first token; 0 on padding


def make_batch(examples, plan, step, rows=None):
    """The batch of `step`, or only rows[0]:rows[1] of it (each process builds the rows of its devices)."""
    if not 0 <= step < plan["steps"]:
        raise IndexError(f"step {step} is outside the plan's {plan['steps']} steps")
    R, T = plan["rows_per_step"], plan["seq_len"]
    lo, hi = rows or (0, R)
    b = {k: np.zeros((hi - lo, T), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    b["loss_mask"] = np.zeros((hi - lo, T), np.float32)
    tokens, offsets, loss_start = examples["tokens"], examples["offsets"], examples["loss_start"]
    for r in range(lo, hi):
        g, t = step * R + r, 0
        for seg, i in enumerate(plan["order"][plan["row_start"][g]:plan["row_start"][g + 1]], 1):
            ids = tokens[offsets[i]:offsets[i + 1]]
            n, x = len(ids), r - lo
            b["tokens"][x, t:t + n] = ids
            b["targets"][x, t:t + n - 1] = ids[1:]
            b["loss_mask"][x, t + loss_start[i] - 1:t + n - 1] = 1.0  # positions that predict output/EOS
            b["segment_ids"][x, t:t + n] = seg
            b["positions"][x, t:t + n] = np.arange(n)
            t += n
    return b


def process_rows(sharding, rows_per_step, seq_len):
    """The rows of a step that this process's devices hold under `sharding`, as sorted, merged spans
    [(first, last + 1), ...]: one span where the process's devices are neighbours on the mesh, several where
    the mesh interleaves hosts (jax.make_mesh follows the torus on a TPU pod, not the host boundaries)."""
    idx = sharding.addressable_devices_indices_map((rows_per_step, seq_len)).values()
    spans = []
    for lo, hi in sorted({s[0].indices(rows_per_step)[:2] for s in idx}):
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(hi, spans[-1][1]))
        else:
            spans.append((lo, hi))
    return spans


def process_batch(examples, plan, step, spans):
    """This process's part of the batch of `step`: the rows of `spans` (process_rows), in that order."""
    parts = [make_batch(examples, plan, step, span) for span in spans]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def global_batch(local, sharding, rows_per_step, seq_len):
    """One global jax.Array per key from each process's rows (process_batch(..., process_rows(...))).
    The local rows fill this process's slices of the global batch in order, wherever they are."""
    import jax
    return {k: jax.make_array_from_process_local_data(sharding, v, (rows_per_step, seq_len))
            for k, v in local.items()}


# ----------------------------------------------------------------------------------------------------
# 8. Several hosts
#
# The same command runs as one process per host (each TPU VM worker of a pod slice, each GPU host);
# jax.distributed joins them, jax.devices() then lists the devices of every host, and the mesh spans them
# all. Each process reads and plans the whole data set (cheap and deterministic) but builds only the rows
# of its own devices, and writes only its own devices' checkpoint shards, so --out must be a directory
# that every host sees (checked at start). All processes take part in every collective: the train step,
# the barriers, the per-tensor gathers of the HF export. Process 0 alone prints, writes metrics.jsonl,
# meta.json and the HF export, uploads and samples.
#
# When a process dies, the others fail at their next collective (the connection to it is reset) or, if
# its host hangs or vanishes, when the coordinator misses its heartbeats for JAX_HEARTBEAT_TIMEOUT
# seconds. They then exit at once with an error that says so (see main), instead of waiting at
# jax.distributed's shutdown barrier for a process that never comes. Restart every process with the same
# command: the run resumes from the last complete checkpoint.
#
# Environment, read by init_distributed (not by JAX): JAX_COORDINATOR_ADDRESS (host:port of process 0),
# JAX_NUM_PROCESSES, JAX_PROCESS_ID; optional JAX_INIT_TIMEOUT (seconds to wait for every process to
# join, 300) and JAX_HEARTBEAT_TIMEOUT (seconds of silence after which a process counts as dead, 100).
# On a Cloud TPU VM none is needed: JAX finds the slice's workers from the TPU metadata.


def _env_int(name, default):
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r}: expected an integer")


def _on_cloud_tpu_vm():
    try:  # set by `import jax` when libtpu finds TPU chips on this machine (a private module: hence the try)
        from jax._src import cloud_tpu_init
        if getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
            return True
    except ImportError:
        pass
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES"))  # GKE


def init_distributed():
    """Join the other processes of this job, if there are any. Returns this process's index."""
    import jax
    env = os.environ
    timeouts = dict(initialization_timeout=_env_int("JAX_INIT_TIMEOUT", 300),
                    heartbeat_timeout_seconds=_env_int("JAX_HEARTBEAT_TIMEOUT", 100))
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise InputError(f"JAX_COORDINATOR_ADDRESS is set, but not {' and '.join(missing)}: every process "
                             "needs the coordinator's host:port, the number of processes and its own id (0, 1, ...)")
        n, i = _env_int("JAX_NUM_PROCESSES", 1), _env_int("JAX_PROCESS_ID", 0)
        if not 0 <= i < n:
            raise InputError(f"JAX_PROCESS_ID={i} must be in [0, JAX_NUM_PROCESSES={n})")
        if jax.config.jax_platforms in (None, "", "cpu") and env.get("JAX_PLATFORMS", "cpu") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                                   process_id=i, **timeouts)
    elif _on_cloud_tpu_vm():
        jax.distributed.initialize(**timeouts)  # coordinator, process count and id from the TPU metadata
    return jax.process_index()


def barrier(name):
    """Wait until every process gets here (a no-op with one process)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def agree(value):
    """Process 0's value of an int, on every process (its view of the shared --out decides)."""
    import jax
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def all_processes(*flags):
    """The flags of every process, one tuple per process (the same list on every process)."""
    import jax
    if jax.process_count() == 1:
        return [tuple(bool(f) for f in flags)]
    from jax.experimental import multihost_utils
    rows = np.asarray(multihost_utils.process_allgather(np.array(flags, bool))).reshape(-1, len(flags))
    return [tuple(bool(f) for f in row) for row in rows]


def check_shared_out(out):
    """With several processes, --out must be one directory that all of them see: each writes its own
    checkpoint shards there and process 0 commits the checkpoint once all are written."""
    import jax
    if jax.process_count() == 1:
        return
    token = agree(int.from_bytes(os.urandom(3), "little"))
    probe = os.path.join(out, f".shared-check-{token}")
    if jax.process_index() == 0:
        open(probe, "w").close()
    barrier("shared-out-written")
    for _ in range(10):  # network filesystems may lag
        seen = os.path.exists(probe)
        if seen:
            break
        time.sleep(0.5)
    blind = [i for i, (ok,) in enumerate(all_processes(seen)) if not ok]
    if jax.process_index() == 0:
        os.remove(probe)
    if blind:
        raise InputError(f"--out {out}: process(es) {blind} do not see the file process 0 wrote there. With several "
                         "hosts, --out must be a directory they all share (NFS, a GCS FUSE mount, ...)")


# ----------------------------------------------------------------------------------------------------
# 9. Checkpoints
#
# OUT/checkpoints/step_00000100/ holds, for each process i, process_0000i.bin (the raw bytes of the slices
# of every saved array that its own devices hold: parameters and AdamW state) and process_0000i.json (its
# index: the name, start, shape, dtype and byte offset of each slice), and meta.json (step, flags, model
# config, data fingerprint, and the device count the data plan was made for).
#
# The commit protocol renames no directory. Object-store mounts (Cloud Storage FUSE, the usual shared
# storage of a TPU pod; blobfuse) rename a directory only when mounted with special options, and never
# atomically; a file rename they emulate (copy, then delete).
#   1. Each process writes its two files under temporary names, flushes them to storage (fsync) and renames
#      each into place.
#   2. The processes tell each other that they have finished (a gather at a step boundary, below).
#   3. Process 0 writes meta.json, also under a temporary name then renamed: meta.json is the commit marker.
# A checkpoint is complete if and only if its meta.json exists: listing, resuming and pruning see only
# complete ones. A directory without meta.json (a crash before 3) is ignored, and deleted by the next run at
# start. Pruning, at each commit, deletes the meta.json of the checkpoints older than the newest --keep (a
# crash can never leave a committed incomplete one); their files, like any uncommitted directory's, are
# deleted by process 0's next writer thread, or right away after a synchronous checkpoint (deleting a
# checkpoint's files takes a while: not on the training path).
#
# Writes run in the background. At a checkpoint the loop copies this process's slices to host memory (the
# step waits for that copy only; it must be taken before the next step, which donates the device buffers)
# and a thread writes the files while training goes on. At every step boundary the processes exchange
# three flags each (SIGTERM received, write finished, write failed): once every thread has finished, process
# 0 commits; if one failed, every process stops with an error. At most one write is in flight: the next
# checkpoint, an HF export and the end of training wait for it. SIGTERM and the last step write
# synchronously. Host memory for the copy: one checkpoint of this process's devices (parameters and both
# AdamW moments, 12 bytes a parameter: 81 GB for Llama-2-7B, 20 GB on each of a v3-32's 4 hosts).
#
# Any layout reads any checkpoint. For each slice its devices need, a process reads the overlapping parts
# of the saved slices from whichever process's file holds them, memory-mapped, so that only those bytes are
# read. A run written on N devices (P processes) continues on M devices (Q processes) wherever the rows of
# a step and hidden_size divide by M; the data plan stays the one the run started with (meta.json's
# data_parallel), so every step holds the same examples.
# Nothing random happens during training (no dropout) and the data order is a pure function of
# (seed, step), so (params, opt_state, step) is the whole state: a resumed run computes exactly what the
# uninterrupted one would have, bit for bit on the same layout, up to float32 summation order on another.

class CheckpointFailed(Exception):
    """A checkpoint could not be written: the run stops, keeping the last complete checkpoint."""


@dataclass(frozen=True)
class PendingWrite:
    """Checkpoint `step`, being written by this process's `thread`; `errors` receives its exception."""
    step: int
    thread: threading.Thread
    errors: list


def checkpoint_dir(out, step):
    return os.path.join(out, "checkpoints", f"step_{step:08d}")


def _fault(point):
    """Fault injection for the tests: ALPACA_CRASH_AT=POINT[:SIGNAL] sends SIGNAL (SIGKILL) to this process at
    POINT: writing-N (halfway through writing checkpoint N), checkpoint-N (its files written, not committed),
    step-N (after step N)."""
    where, _, sig = os.environ.get("ALPACA_CRASH_AT", "").partition(":")
    if where == point:
        os.kill(os.getpid(), signal.Signals[sig or "SIGKILL"])


@contextmanager
def _replaced(path, mode):
    """Write `path` under a temporary name, flush it to storage, then rename it into place."""
    tmp = path + ".partial"
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def start_checkpoint(out, step, state):
    """Copy this process's slices of `state` (a pytree of global jax.Arrays) to host memory, then write them
    into checkpoint `step` in a background thread (step 1 of the protocol). The caller waits for the copy only."""
    import jax
    import llama
    shards = []
    for name, arr in llama.named_leaves(state):
        seen = set()
        for shard in arr.addressable_shards:  # each distinct slice once (a replicated one is on every device)
            start = tuple(s.indices(n)[0] for s, n in zip(shard.index, arr.shape))
            if start not in seen:
                seen.add(start)
                shard.data.copy_to_host_async()  # all transfers start at once
                shards.append((name, start, shard.data))
    pieces = [(name, start, np.array(data)) for name, start, data in shards]  # a copy, not a view of the buffer
    base = os.path.join(checkpoint_dir(out, step), f"process_{jax.process_index():05d}")
    first, errors = jax.process_index() == 0, []

    def write():
        try:
            if first:
                remove_uncommitted(out, but=step)  # the files of pruned checkpoints
            _write_pieces(base, pieces, step)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
    thread.start()
    return PendingWrite(step, thread, errors)


def _write_pieces(base, pieces, step):
    """BASE.bin (the slices' bytes, each at a 64-byte aligned offset) and BASE.json (its index)."""
    os.makedirs(os.path.dirname(base), exist_ok=True)
    index, offset = [], 0
    with _replaced(base + ".bin", "wb") as fh:
        for i, (name, start, data) in enumerate(pieces):
            if i == len(pieces) // 2:
                _fault(f"writing-{step}")
            fh.write(b"\0" * (-offset % 64))
            offset += -offset % 64
            fh.write(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)  # any dtype, bfloat16 included
            index.append({"name": name, "start": list(start), "shape": list(data.shape), "dtype": str(data.dtype),
                          "offset": offset})
            offset += data.nbytes
    with _replaced(base + ".json", "w") as fh:
        json.dump({"pieces": index}, fh)
    _fault(f"checkpoint-{step}")


def finish_checkpoint(pending, out, meta, keep, wait=True):
    """At a step boundary, on every process: commit the pending write (or None) if every process's thread
    has finished, waiting for them if `wait`; raise CheckpointFailed on every process if one failed.
    Returns (the write still pending or None, whether any process received SIGTERM)."""
    if pending and wait:
        pending.thread.join()
    done = pending is None or not pending.thread.is_alive()
    failed = done and bool(pending and pending.errors)
    flags = all_processes(_Preempted.requested, done, failed)  # one gather serves SIGTERM and the writes
    preempted = any(f[0] for f in flags)
    if pending is None or not all(f[1] for f in flags):
        return pending, preempted
    failed_on = [i for i, f in enumerate(flags) if f[2]]
    if failed_on:
        why = f": {type(pending.errors[0]).__name__}: {pending.errors[0]}" if pending.errors else ""
        raise CheckpointFailed(f"writing checkpoint {checkpoint_dir(out, pending.step)} failed on process(es) "
                               f"{failed_on}{why}. Nothing was committed for step {pending.step}; the latest complete "
                               f"checkpoint is {latest_checkpoint(out)}.")
    commit_checkpoint(out, pending.step, meta, keep)
    return None, preempted


def commit_checkpoint(out, step, meta, keep):
    """Step 3, once every process has written its files: process 0 writes meta.json, then prunes the
    complete checkpoints older than the newest `keep` (their meta.json; remove_uncommitted deletes the rest)."""
    import jax
    if jax.process_index() != 0:
        return
    with _replaced(os.path.join(checkpoint_dir(out, step), "meta.json"), "w") as fh:
        json.dump(dict(meta, step=step, processes=jax.process_count(), devices=jax.device_count()), fh, indent=1)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        os.remove(os.path.join(checkpoint_dir(out, old), "meta.json"))


def save_checkpoint(out, step, state, meta, keep):
    """Write state (a pytree of global jax.Arrays) as checkpoint `step`, commit it and keep the newest
    `keep`, waiting for all of it. Every process calls it. Returns the checkpoint's directory."""
    import jax
    finish_checkpoint(start_checkpoint(out, step, state), out, meta, keep)
    if jax.process_index() == 0:
        remove_uncommitted(out)
    return checkpoint_dir(out, step)


def checkpoint_after_step(pending, c, step, steps, state, meta, say):
    """The loop's checkpointing after `step`, on every process: commit or fail the pending write
    (finish_checkpoint), then write checkpoint `step` if due: every --checkpoint_every steps in the
    background, at the end and on SIGTERM (to any process) synchronously. Returns (pending, preempted)."""
    _fault(f"step-{step}")
    pending, preempted = finish_checkpoint(pending, c.out, meta, c.keep_checkpoints, wait=False)
    if preempted or step == steps:
        finish_checkpoint(pending, c.out, meta, c.keep_checkpoints)
        say(f"checkpoint {save_checkpoint(c.out, step, state, meta, c.keep_checkpoints)}")
        return None, preempted
    if c.checkpoint_every and step % c.checkpoint_every == 0:
        finish_checkpoint(pending, c.out, meta, c.keep_checkpoints)  # at most one write in flight
        pending = start_checkpoint(c.out, step, state)
        say(f"checkpoint {checkpoint_dir(c.out, step)} (writing in the background)")
    return pending, preempted


def list_checkpoints(out):
    """Steps of the complete (committed) checkpoints in OUT, oldest first."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(d[5:]) for d in os.listdir(root)
                  if re.fullmatch(r"step_\d{8}", d) and os.path.exists(os.path.join(root, d, "meta.json")))


def latest_checkpoint(out):
    """'step N' of the newest complete checkpoint, or 'none', for messages."""
    kept = list_checkpoints(out)
    return f"step {kept[-1]}" if kept else "none"


def remove_uncommitted(out, but=-1):
    """Delete the checkpoint directories without meta.json, but that of step `but` (being written): pruned
    checkpoints and what interrupted writes left. Process 0 only, while no other write is in flight."""
    root = os.path.join(out, "checkpoints")
    for d in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, d)
        if re.fullmatch(r"step_\d{8}", d) and os.path.isdir(path) and path != checkpoint_dir(out, but) \
                and not os.path.exists(os.path.join(path, "meta.json")):
            shutil.rmtree(path, ignore_errors=True)


def read_checkpoint_meta(out, step):
    with open(os.path.join(checkpoint_dir(out, step), "meta.json")) as fh:
        return json.load(fh)


def resume_point(out):
    """(step, data_parallel) of the latest complete checkpoint in OUT, (0, 0) if there is none, as process 0
    sees them: its view of the shared --out decides."""
    import jax
    step = data_parallel = 0
    done = list_checkpoints(out) if jax.process_index() == 0 else []
    if done:
        step, data_parallel = done[-1], read_checkpoint_meta(out, done[-1]).get("data_parallel", 0)
    return agree(step), agree(data_parallel)


def data_hash(examples):
    """A fingerprint of the tokenized data: a resumed run must see the examples the plan was made from."""
    h = hashlib.sha256()
    for k in ("tokens", "offsets", "loss_start"):
        h.update(np.ascontiguousarray(examples[k]).tobytes())
    return h.hexdigest()[:32]


def weights_fingerprint(model_dir):
    """A fingerprint of a checkpoint's weights, cheap at any size: each tensor's name, shape and dtype, and 16
    of its rows spread evenly, read from the safetensors files. A LoRA checkpoint holds only the adapters; this
    is how a resume knows that --model still holds the base weights they were trained on."""
    import llama
    from safetensors import safe_open
    _, where, expected = llama.check_checkpoint(model_dir)
    h = hashlib.sha256()
    for file in sorted(set(where[name] for name in expected)):
        with safe_open(file, framework="numpy") as f:
            for name in sorted(n for n in expected if where[n] == file):
                sl = f.get_slice(name)
                shape = sl.get_shape()
                h.update(f"{name} {shape} {sl.get_dtype()}".encode())
                for r in sorted(set(np.linspace(0, shape[0] - 1, 16).astype(int))):
                    h.update(np.ascontiguousarray(sl[int(r):int(r) + 1]).tobytes())
    return h.hexdigest()[:32]


def load_checkpoint(out, step, like):
    """The state saved at `step`, shaped and sharded like `like` (a pytree of jax.ShapeDtypeStruct with
    .sharding), whatever device layout wrote it. Each slice this process's devices need is assembled from the
    overlapping parts of the saved slices, read memory-mapped from whichever process's file holds them."""
    import jax
    import llama
    directory = checkpoint_dir(out, step)
    saved = {}  # name -> {(start, shape): (file, dtype, offset)}, each distinct slice once
    for index in sorted(glob.glob(os.path.join(directory, "process_*.json"))):
        with open(index) as fh:
            for p in json.load(fh)["pieces"]:
                saved.setdefault(p["name"], {}).setdefault((tuple(p["start"]), tuple(p["shape"])),
                                                           (index[:-5] + ".bin", np.dtype(p["dtype"]), p["offset"]))
    files = {}

    def piece(file, dtype, offset, shape):
        if file not in files:
            files[file] = np.memmap(file, np.uint8, mode="r")
        return files[file][offset:offset + dtype.itemsize * math.prod(shape)].view(dtype).reshape(shape)

    def build(name, leaf):
        def read(index):
            lo = [s.indices(n)[0] for s, n in zip(index, leaf.shape)]
            hi = [s.indices(n)[1] for s, n in zip(index, leaf.shape)]
            local, filled = np.empty([b - a for a, b in zip(lo, hi)], leaf.dtype), 0
            for (start, shape), (file, dtype, offset) in saved.get(name, {}).items():
                a = [max(x, s) for x, s in zip(lo, start)]
                b = [min(x, s + n) for x, s, n in zip(hi, start, shape)]
                if any(x >= y for x, y in zip(a, b)):
                    continue  # no overlap
                if dtype != leaf.dtype:
                    raise InputError(f"{directory}: {name} was saved as {dtype}, this run needs {leaf.dtype}")
                part = piece(file, dtype, offset, shape)[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, start))]
                local[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))] = part
                filled += math.prod(y - x for x, y in zip(a, b))
            if filled != local.size:
                raise InputError(f"{directory}: the saved slices of {name} do not cover [{lo}, {hi})")
            return local
        return jax.make_array_from_callback(leaf.shape, leaf.sharding, read)

    leaves = [build(name, leaf) for name, leaf in llama.named_leaves(like)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


# ----------------------------------------------------------------------------------------------------
# 10. The memory plan (--dry_run)
#
# What ONE device holds at the peak of a step, known before any accelerator is paid for. The figure is
# XLA's, not a formula: a child process with N virtual CPU devices compiles the real train step
# (make_step, what train() runs) for abstract inputs carrying their shardings (no weights are read) and
# reports compiled.memory_analysis(). The arguments are the parameter shards, the AdamW moments and the
# batch (split by their known sizes); the temporaries hold the float32 gradient shards (their known size)
# and the activations, the gathered bfloat16 weights and whatever else the step needs at its peak.
# Compiling the 7B step takes tens of seconds on 2 CPU cores, so every result is cached in --cache_dir.

DEVICE_MEMORY_GB = {  # HBM per jax device (1e9 bytes), from the datasheets; a TPU v3 core has 16 GiB
    "TPU v3": 17.18, "TPU v4": 34.36, "TPU v5 lite": 17.18, "TPU v5e": 17.18, "TPU v5p": 102.0,
    "TPU v6 lite": 34.36, "TPU v6e": 34.36, "A100-SXM4-40GB": 40.0, "A100-PCIE-40GB": 40.0, "A100": 80.0,
    "H100": 80.0, "H200": 141.0,
}
COMMON_DEVICES = {"TPU v3 core": "TPU v3", "TPU v5e": "TPU v5e", "TPU v4": "TPU v4", "A100-40GB": "A100-SXM4-40GB",
                  "A100-80GB": "A100", "H100": "H100", "H200": "H200"}  # the table printed on CPU: name -> kind


def device_memory_gb(device, override):
    """--device_memory_gb, else what a step may use on this device: a known TPU's HBM, or the part of a
    known GPU's that JAX takes (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set); None on CPU."""
    if override:
        return override
    gb = by_device_kind(DEVICE_MEMORY_GB, device)
    if gb and getattr(device, "platform", "") == "gpu":
        gb *= float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    return gb


def abstract_train_inputs(mc, mesh, param_dtype, rows, seq_len, lc=None):
    """(params, trained, opt_state, batch) of the train step as ShapeDtypeStructs with their shardings: what
    the step compiles for, without a single weight in memory. `trained` is what the step updates: the
    parameters, or with LoRA (lc) the float32 adapters (params are then the frozen base)."""
    import jax
    import llama
    import sharding
    from jax.sharding import NamedSharding, PartitionSpec
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, param_dtype), llama.param_shapes(mc),
                          is_leaf=lambda s: isinstance(s, tuple))
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                          sharding.param_specs(shapes, mesh))
    trained = params if lc is None else jax.tree.map(
        lambda s, sp: jax.ShapeDtypeStruct(s, np.float32, sharding=NamedSharding(mesh, sp)),
        llama.lora_shapes(mc, lc), sharding.lora_specs(mc, lc), is_leaf=lambda s: isinstance(s, tuple))
    # sharding.init_opt_state's tree, from jax.eval_shape, with the shardings init_opt_state gives (which
    # eval_shape does not report): a leaf at path X/NAME is sharded as the trained NAME, one with no such leaf
    # (the update count) replicated.
    like = dict(llama.named_leaves(trained))
    opt_state = jax.tree_util.tree_map_with_path(
        lambda path, o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=getattr(
            like.get(llama.path_name(path[1:])), "sharding", NamedSharding(mesh, PartitionSpec()))),
        jax.eval_shape(lambda: sharding.init_opt_state(trained)))
    dtypes = {k: (np.float32 if k == "loss_mask" else np.int32) for k in sharding.BATCH_KEYS}  # as make_batch
    batch = {k: jax.ShapeDtypeStruct((rows, seq_len), dtypes[k], sharding=sharding.batch_sharding(mesh))
             for k in sharding.BATCH_KEYS}
    return params, trained, opt_state, batch


def _shard_bytes(tree):
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compile_memory_child():
    """In the child process (stdin: one JSON request): compile the step, print its memory as JSON."""
    import jax
    import llama
    import sharding
    request = json.load(sys.stdin)
    c, mc = Config(**request["config"]), llama.LlamaConfig(**request["model_config"])
    lc = lora_config(c, mc)
    mesh = sharding.make_mesh()
    params, trained, opt_state, batch = abstract_train_inputs(mc, mesh, jax.numpy.dtype(c.param_dtype),
                                                              request["rows"], request["seq_len"], lc)
    t0 = time.perf_counter()
    step = make_step(c, mc, lc, mesh, steps=1000, micro=request["micro_batches"])
    base = (params,) if lc else ()  # LoRA's step takes the frozen base as its last argument
    m = step.lower(trained, opt_state, batch, *base).compile().memory_analysis()
    print(json.dumps({
        "arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
        "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
        "parameters": _shard_bytes([params, *([trained] if lc else [])]),  # LoRA: the base and the adapters
        "adamw_moments": _shard_bytes([opt_state["mu"], opt_state["nu"]]),
        "gradients": _shard_bytes(opt_state["mu"]),  # float32, shaped and sharded as what is trained
        "compile_seconds": round(time.perf_counter() - t0, 1)}))


def compiled_memory(c, mc, devices, rows, micro):
    """XLA's memory figures (bytes per device) of the train step for `devices` devices and a step of
    rows x --seq_len in `micro` micro-batches, compiled in a child process on virtual CPU devices; cached."""
    import jax
    seq_len = c.seq_len
    request = {"config": dataclasses.asdict(c), "model_config": dataclasses.asdict(mc), "rows": rows,
               "seq_len": seq_len, "micro_batches": micro}
    what = {**request, "devices": devices, "jax": jax.__version__,
            "config": {k: getattr(c, k) for k in ("param_dtype", "compute_dtype", "no_remat", "lora_rank", "lora_alpha",
                                                  "lora_targets")}}
    path = os.path.join(c.cache_dir, "memory", hashlib.sha256(json.dumps(what, sort_keys=True).encode())
                        .hexdigest()[:20] + ".json")
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    here = os.path.dirname(os.path.abspath(__file__))
    print(f"memory plan: compiling the train step for {devices} devices, {rows} rows x {seq_len} tokens, "
          f"{micro} micro-batch(es) ...", file=sys.stderr, flush=True)
    child = subprocess.run([sys.executable, "-c", "import alpaca; alpaca.compile_memory_child()"], cwd=here,
                           env=env, input=json.dumps(request), capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"compiling the train step for the memory plan failed:\n{child.stderr[-3000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _replaced(path, "w") as fh:
        json.dump(result, fh)
    return result


def memory_parts(m):
    """Bytes per device at the peak of a step, by what holds them; the parts add up to the total."""
    grads = m["gradients"] if m["temporaries"] >= m["gradients"] else 0
    parts = {"parameters": m["parameters"], "adamw_moments": m["adamw_moments"],
             "batch_and_step_count": m["arguments"] - m["parameters"] - m["adamw_moments"],
             "gradients": grads, "activations_and_other_temporaries": m["temporaries"] - grads,
             "outputs_not_aliased": m["outputs"] - m["aliased"]}
    return {**parts, "total": sum(parts.values())}


def memory_plan(c, mc, lengths, devices, limit_gb):
    """The memory plan of these flags on `devices` devices: XLA's figures per device, whether they fit a
    device of limit_gb, and if not, the flags that make them fit, each checked by its own compile."""
    rows, micro = step_rows(c, lengths, devices)
    plan = {"devices": devices, "rows": rows, "seq_len": c.seq_len, "micro_batches": micro,
            **memory_parts(compiled_memory(c, mc, devices, rows, micro)), "device_memory_gb": limit_gb}
    if not limit_gb:
        return plan
    plan["fits"] = plan["total"] <= limit_gb * 1e9
    if not plan["fits"]:
        plan["fixes"] = _fixes(c, mc, lengths, devices, plan, limit_gb * 1e9)
    return plan


def _fixes(c, mc, lengths, devices, plan, budget):
    """Flags that make the step fit `budget` bytes per device, each checked by compiling it. Three kinds,
    each a list along which memory falls, so a bisection finds the mildest change that fits in a few
    compiles: on the same devices (only when parameters and AdamW state alone fit there), (1) more
    micro-batches, fewer tokens per forward pass (the first split adds a float32 gradient accumulator, so it
    can cost memory); (2) shorter rows, as many of them, i.e. fewer examples per step; (3) more devices,
    the same flags. (bfloat16 master weights do not help: the update's float32 copies take it back.)"""
    def fits(x):
        x["total"] = memory_parts(compiled_memory(x["config"], mc, x["devices"], *step_rows(x["config"], lengths,
                                                                                               x["devices"])))["total"]
        return x["total"] <= budget

    def candidate(n=devices, **flags):
        return {"config": dataclasses.replace(c, **flags), "devices": n, "flags": flags}

    tokens_per_pass = plan["rows"] // plan["micro_batches"] * plan["seq_len"]
    shorter = [c.seq_len >> i for i in range(1, 8) if c.seq_len >> i >= c.max_len]
    same_devices = plan["parameters"] + plan["adamw_moments"] < budget
    reset = {"micro_batch_size": 0} if c.micro_batch_size else {}  # the rows change: a micro-batch may not divide them
    kinds = [
        sorted((candidate(**({"seq_len": t} if t != c.seq_len else {}), micro_batch_size=m)
                for t in [c.seq_len] + shorter
                for rows in [step_rows(dataclasses.replace(c, seq_len=t, micro_batch_size=0), lengths, devices)[0]]
                for m in range(devices, rows, devices) if rows % m == 0 and m * t < tokens_per_pass),
               key=lambda x: (-x["flags"]["micro_batch_size"] * x["config"].seq_len, -x["config"].seq_len)),
        [candidate(seq_len=t, batch_size=max(1, c.batch_size * t // c.seq_len), **reset) for t in shorter],
    ] if same_devices else []
    kinds.append([candidate(n, data_parallel=n, **reset) for n in (2 * devices, 4 * devices)
                  if mc.hidden_size % n == 0])
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
    lines = [f"memory per device at the peak of a step: {p['devices']} devices, {p['rows']} rows x {p['seq_len']} "
             f"tokens, {p['micro_batches']} micro-batch(es); XLA's figure for the compiled train step"]
    lines += [f"  {names[k]:<52}{gb(p[k])}" for k in names]
    lines.append(f"  {'total':<52}{gb(p['total'])}")
    if p.get("device_memory_gb"):
        verdict = "fits" if p["fits"] else "does NOT fit"
        lines.append(f"  {verdict} a device of {p['device_memory_gb']:g} GB (--device_memory_gb)")
        for f in p.get("fixes", []):
            lines.append(f"  fits with {f['flags']}: {f['total'] / 1e9:.2f} GB per device on {f['devices']} devices")
        if not p["fits"] and not p.get("fixes"):
            lines.append("  no micro-batch, row length or device count tried fits: more devices, or a smaller model")
    else:
        fit = {name: "yes" if p["total"] <= DEVICE_MEMORY_GB[kind] * 1e9 else "no"
               for name, kind in COMMON_DEVICES.items()}
        lines.append("  fits: " + ", ".join(f"{name} ({DEVICE_MEMORY_GB[COMMON_DEVICES[name]]:g} GB) {ok}"
                                          for name, ok in fit.items()) + "; --device_memory_gb checks one")
    lines.append("  a planning estimate: buffer assignment on CPU, where this was compiled, differs a little "
                 "from a GPU's or TPU's")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# 11. Hugging Face export, upload and generation
#
# The export is a directory that transformers' AutoModelForCausalLM and AutoTokenizer load unchanged:
# config.json, safetensors (sharded above 2 GB), generation_config.json and the tokenizer. We write the
# tokenizer's json configs ourselves (LlamaTokenizer, BOS added, legacy): transformers 5.x loads a folder
# holding only tokenizer.model as a tokenizer that adds no BOS. We never add a pad token (packing needs
# none), so the vocabulary is the base model's.


def hf_root(c):
    return c.hf_save_path or os.path.join(c.out, "hf")


def export_hf(run, state, path, say):
    """Every process calls this (the per-tensor gathers are collective); process 0 writes. With LoRA
    adapters: `path` gets the merged model (W + alpha/r A B: a plain Llama) and `path`-adapter the PEFT
    adapter directory, whose adapter_config.json names --model as the base (a local one by its absolute path)."""
    import jax.numpy as jnp
    import llama
    c, mc, lc = run.c, run.mc, run.lc
    params, adapters = state.get("base", state.get("params")), state.get("lora")
    tok = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False, "legacy": True,
           "model_max_length": mc.max_position_embeddings}
    gen = {"bos_token_id": mc.bos_token_id, "eos_token_id": mc.eos_token_id, "do_sample": False}
    extra = {"tokenizer_config.json": tok, "generation_config.json": gen,
             "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}}
    tokenizer = [tokenizer_path(c.tokenizer or run.model_dir)]
    llama.save_hf(path, mc, params, dtype=jnp.dtype(c.hf_dtype), extra_files=extra, copy_files=tokenizer,
                  lora=adapters, lora_scale=lc.scale if lc else 1.0)
    say(f"exported Hugging Face checkpoint to {path}{' (LoRA merged)' if lc else ''}")
    if lc:
        base = os.path.abspath(c.model) if os.path.isdir(c.model) else c.model
        llama.save_peft(f"{path}-adapter", mc, lc, adapters, base_model=base, copy_files=tokenizer, extra_files=extra)
        say(f"exported PEFT adapter to {path}-adapter")


def upload_hf(path, repo_id, say):
    """Upload an export to the Hub (token from HF_TOKEN or `hf auth login`). A failure keeps the local copy."""
    try:
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, private=True)
        api.upload_folder(repo_id=repo_id, folder_path=path, commit_message="Alpaca fine-tune (alpaca.py)")
    except Exception as e:
        say(f"upload to {repo_id} failed ({type(e).__name__}: {e}); the export is kept at {path}")
        return 3
    say(f"uploaded {path} to https://huggingface.co/{repo_id}")
    return 0


def load_for_generation(model):
    """(config, float32 params, directory holding the tokenizer) of a Hugging Face checkpoint, or of a PEFT
    adapter directory merged into the base model its adapter_config.json names."""
    import llama
    path = llama.resolve_model_path(model)
    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        return (*llama.load_hf(path), path)
    lc, base = llama.read_peft_config(path)
    base_path = llama.resolve_model_path(base)
    mc, params = llama.load_hf(base_path)
    params = llama.merge_lora_params(params, llama.load_peft(path, mc, lc), lc.scale)
    return mc, params, path if os.path.exists(os.path.join(path, "tokenizer.model")) else base_path


def respond(model, instruction, input_text="", *, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0):
    """The model's answer to one Alpaca-formatted instruction: prompt with BOS, generate, cut at EOS."""
    import jax
    import llama
    mc, params, path = load_for_generation(model)
    sp = load_tokenizer(path)
    ids = [sp.bos_id()] + sp.encode(format_prompt({"instruction": instruction, "input": input_text}))
    new = min(max_new_tokens, answer_room(ids, mc))
    out = llama.generate(params, np.array([ids], np.int32), mc, max_new_tokens=new, temperature=temperature,
                         top_p=top_p, key=jax.random.PRNGKey(seed), eos_token_id=sp.eos_id())
    out = [int(t) for t in np.asarray(out)[0]]
    if sp.eos_id() in out:
        out = out[:out.index(sp.eos_id())]
    return sp.decode(out).strip()


def generate_main(argv):
    p = argparse.ArgumentParser(prog="alpaca.py generate",
                                description="Answer an instruction with a checkpoint, through the Alpaca template.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory or Hub repo id, or a PEFT LoRA "
                                                  "adapter (merged into the base model its adapter_config.json names)")
    p.add_argument("--instruction", required=True)
    p.add_argument("--input", default="", help="optional context for the instruction")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    check_generate(a)
    import llama
    try:
        answer = respond(a.model, a.instruction, a.input, max_new_tokens=a.max_new_tokens,
                         temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    except llama.CheckpointError as e:
        raise InputError(f"--model {a.model}: {e}")
    print(answer)
    return 0


# ----------------------------------------------------------------------------------------------------
# 12. main


def plan_run(c):
    """The data plan and the memory plan of these flags, from config.json and the tokenizer alone:
    (data statistics, memory plan)."""
    import jax
    dp = c.data_parallel or jax.device_count()
    examples, _, info = prepare_data(c, dp)
    _, mc = model_config(c, weights=False)
    check_hidden_size(mc, dp)
    limit = device_memory_gb(jax.devices()[0], c.device_memory_gb)
    return info, memory_plan(c, mc, example_lengths(examples), dp, limit)


def dry_run(c):
    """--dry_run: the memory plan for a person on stderr, then everything as one JSON line on stdout."""
    info, plan = plan_run(c)
    print(format_memory_plan(plan), file=sys.stderr, flush=True)
    print(json.dumps({**info, "memory": plan}))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    c = None
    try:
        if argv[:1] == ["generate"]:
            return generate_main(argv[1:])
        c = parse_config(argv)
        check_flags(c)
        if c.dry_run:
            return dry_run(c)
        init_distributed()
        return train(c)
    except InputError as e:
        status, message = 2, str(e)
    except (TrainingDiverged, CheckpointFailed) as e:
        status, message = 1, str(e)
    except Exception as e:
        if not _joined():
            raise
        import traceback
        traceback.print_exc()
        status, message = 1, _failed_message(e, c)
    print(f"alpaca.py: error: {message}", file=sys.stderr)
    if _joined():
        # Skip Python's exit, whose jax.distributed handler waits at a shutdown barrier (up to 300 s, then
        # aborts) for every process, dead ones included. Our connections close at once, so the other
        # processes fail at their next collective instead of waiting on us.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _joined():
    """Whether this process is one of several joined by jax.distributed."""
    if "jax" not in sys.modules:
        return False
    import jax
    return jax.distributed.is_initialized() and jax.process_count() > 1


def _failed_message(e, c):
    import jax
    first = (str(e).strip().splitlines() or [""])[0]
    kept = list_checkpoints(c.out) if c else []
    resume = (f"the run resumes from the last complete checkpoint, {checkpoint_dir(c.out, kept[-1])}" if kept
              else "there is no complete checkpoint yet: the run starts afresh")
    return (f"process {jax.process_index()} of {jax.process_count()} stopped: {type(e).__name__}: {first}\n"
            f"If another process of this job died or lost its connection, its log says why. Restart all "
            f"{jax.process_count()} processes with the same command: {resume}.")


if __name__ == "__main__":
    sys.exit(main())
