"""Useful tokens per second, MFU and packing efficiency of the train step, side by side with HF/PyTorch.

    .venv/bin/python benchmarks/bench.py               # tiny + ~100M configs, a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench.py --configs 100m --batch_size 8 --steps 3 --remat off

What it does, in one run on the current jax backend (CPU, GPU or TPU):
  1. Example lengths: the records of --data (Stanford's alpaca_data.json, 52,002 records; by default the
     2,000-record sample shipped in tests/assets) under the LLaMA tokenizer shipped there. Token ids are the
     real ones modulo the model's vocabulary: speed does not depend on them, the lengths and loss boundaries
     do.
  2. A matmul peak measured now, on this backend, in the compute dtype (the denominator of "MFU vs measured").
  3. For each model config: sharding.make_train_step (the real FSDP step, over all devices, AdamW included)
     on packed rows (alpaca.py's planner) and on the same examples with --no_pack (one example per row,
     padded to seq_len); then, when torch and transformers are installed, transformers' LlamaForCausalLM +
     torch.optim.AdamW on the same examples with Stanford Alpaca's collator (micro-batches of 4 padded to
     their longest example, gradient accumulation to batch_size). Random weights, same shapes.
  4. Packing efficiency of alpaca.py's planner at rows of 512..4096 tokens, 128 examples a step.
  5. A projection of the full recipe (Llama-2-7B, 1218 steps of 128 examples) on a TPU v3-32 and 8xA100.
Every measurement is one JSON line on stdout; a table follows at the end.

Definitions. A step is one optimizer update of batch_size examples (on average, when packing). Seconds per
step: the median of --steps timed steps after --warmup untimed ones (the first includes compilation, which
is timed separately). Loss tokens: the output + EOS tokens that carry the loss; real tokens: all non-pad
tokens; token slots: rows x row length (what the hardware computes). Useful FLOPs (llama.train_flops,
nanoGPT/PaLM convention): 6 x matmul parameters per real token + attention within each example only;
padding, attention across packed examples and the remat recompute are not counted, so MFU is the useful
fraction of the peak. HF steps are counted with the same formula on the same examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import alpaca  # noqa: E402
import llama  # noqa: E402
import sharding  # noqa: E402

# The data is --data (Stanford's alpaca_data.json: download it, 52,002 records), by default the 2,000-record
# sample shipped in tests/assets; the tokenizer is Meta's LLaMA tokenizer, also shipped there.
SAMPLE = os.path.join(ROOT, "tests", "assets", "alpaca", "alpaca_sample_2000.json")
TOKENIZER = os.path.join(ROOT, "tests", "assets", "llama_tokenizer", "tokenizer.model")

CONFIGS = {
    # stories260K's shape (tests/assets/stories260K, the demo preset's model): 0.26M parameters.
    "tiny": llama.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                              tie_word_embeddings=True),
    # ~100M: GPT-2-small widths with Llama's MLP and vocabulary, 134M parameters (110M in matmuls).
    "100m": llama.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                              num_attention_heads=12, num_key_value_heads=12, head_dim=64),
    # 58M: hidden 512, 8 layers, Llama's vocabulary (an HF/torch CPU baseline of ours).
    "58m": llama.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=8, head_dim=64),
    # ~1B: TinyLlama-1.1B's shapes (grouped-query attention, 4 kv heads), 1.1B parameters.
    "1b": llama.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4, head_dim=64),
    "llama2-7b": llama.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                   head_dim=128, max_position_embeddings=4096),
    "llama2-13b": llama.LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                                    num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                                    head_dim=128, max_position_embeddings=4096),
}
DEFAULT_BATCH = {"tiny": 32, "100m": 8, "58m": 16}  # examples per step: a few seconds a step on 2 CPU cores
# --no_pack pads every example to seq_len: ~4x the slots of packing, too slow for the default run at 100m.
DEFAULT_MODES = {"tiny": "packed,no_pack,hf"}


def emit(rec):
    print(json.dumps(rec), flush=True)
    return rec


def n_params(mc):
    shapes = jax.tree.leaves(llama.param_shapes(mc), is_leaf=lambda s: isinstance(s, tuple))
    return int(sum(math.prod(s) for s in shapes))


# ---------------------------------------------------------------------------------------------------------
# Data: real example lengths and loss boundaries


def load_examples(data, cache_dir, max_len=512):
    """Tokenized examples of `data` (a path or URL of Alpaca records) under the LLaMA tokenizer, and where
    they came from."""
    records = alpaca.load_records(data, cache_dir)
    examples, stats, _ = alpaca.tokenize_cached(records, alpaca.load_tokenizer(TOKENIZER), max_len, cache_dir)
    note = "the 2,000-record sample in tests/assets (pass --data alpaca_data.json for all of Alpaca)" \
        if data == SAMPLE else f"{len(records):,} records"
    return examples, {"data": data, "data_note": note, **stats}


def step_plans(examples, *, batch_size, seq_len, steps, seed=0, data_parallel=1):
    """The packed plan of `steps` steps, and a --no_pack plan of `steps` FULL steps (batch_size examples a
    step, each padded to seq_len) of the same shuffled examples, in the same order: the first
    steps x batch_size examples of a packed plan long enough to hold them. No step is part empty. Packed
    rows are a multiple of data_parallel (the devices they split over)."""
    lengths = alpaca.example_lengths(examples)
    R = alpaca.choose_rows_per_step(lengths, batch_size=batch_size, seq_len=seq_len,
                                    data_parallel=data_parallel)
    longer = alpaca.plan_steps(lengths, seed=seed, rows_per_step=R, seq_len=seq_len, steps=2 * steps + 2)
    packed = alpaca.plan_steps(lengths, seed=seed, rows_per_step=R, seq_len=seq_len, steps=steps)
    ids = longer["order"][:steps * batch_size]
    n = steps
    rows = [[int(i)] for i in ids]
    padded = {"order": ids.copy(),
              "row_start": np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64),
              "epoch": np.zeros(n, np.int32), "steps": n, "rows_per_step": batch_size, "seq_len": seq_len,
              "steps_per_epoch": n}
    return packed, padded


def step_examples(plan, k):
    R = plan["rows_per_step"]
    return plan["order"][plan["row_start"][k * R]:plan["row_start"][(k + 1) * R]]


def counts(examples, plan, k):
    ids = step_examples(plan, k)
    lengths = alpaca.example_lengths(examples)[ids]
    return {"real": int(lengths.sum()), "loss": int((lengths - examples["loss_start"][ids]).sum()),
            "slots": plan["rows_per_step"] * plan["seq_len"], "examples": len(ids), "lengths": lengths}


# ---------------------------------------------------------------------------------------------------------
# Peaks


def matmul_peak(dtype, n=None, reps=5):
    """FLOP/s of one n x n x n matmul on one device of this backend, median of reps."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / float(np.median(ts))


def datasheet_peak(dtype):
    """Dense bf16 peak per device from the datasheets (alpaca.PEAK_TFLOPS), for bf16 compute on GPU/TPU."""
    if jax.default_backend() == "cpu" or jnp.dtype(dtype) != jnp.bfloat16:
        return None
    kind = getattr(jax.devices()[0], "device_kind", "")
    t = next((v for k, v in alpaca.PEAK_TFLOPS.items() if k in kind), None)
    return t * 1e12 if t else None


# ---------------------------------------------------------------------------------------------------------
# Our step


def train_step(mc, mesh, args, micro_batches, lora):
    """alpaca.make_step's train step with the recipe's AdamW, in --compute_dtype, remat as --remat says."""
    c = alpaca.Config(compute_dtype=args.compute_dtype, no_remat=args.remat == "off")
    return alpaca.make_step(c, mc, lora, mesh, 10_000, micro_batches)


def compile_jax(mc, examples, plan, args, mesh, micro_batches=1, lora=None):
    """The train step compiled for parameters and AdamW state that do not exist yet (shapes and shardings
    only), so that the memory it needs is known before any of it is allocated; and the batches it will run.
    With `lora` (a llama.LoraConfig), the LoRA step: float32 adapters on a base in --compute_dtype, so that
    what differs from the full step is only what is trained and differentiated.
    Returns (compiled step, batches, compile seconds, bytes the step needs per device)."""
    vocab_examples = {**examples, "tokens": examples["tokens"] % mc.vocab_size}
    step = train_step(mc, mesh, args, micro_batches, lora)
    batches = [sharding.shard_batch(alpaca.make_batch(vocab_examples, plan, k), mesh)
               for k in range(args.warmup + args.steps)]
    base_dtype = jnp.dtype(args.compute_dtype) if lora else jnp.float32
    state = sharding.abstract_state(mc, mesh, base_dtype, lora)
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    try:  # per device; donated parameters and state are aliased to the outputs. Best effort: may be None
        mem = compiled.memory_analysis()
    except NotImplementedError:
        mem = None
    need = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes) if mem else None
    return compiled, batches, compile_s, need


def run_jax(name, mode, mc, examples, plan, args, peaks, mesh, compiled, batches, compile_s, need,
            micro_batches=1, lora=None):
    """Random parameters (with `lora`: a base in --compute_dtype and adapters) and AdamW state compiled
    straight into their sharding, then warmup + steps timed."""
    params = sharding.init_sharded_params(mc, jax.random.key(0), mesh,
                                          dtype=jnp.dtype(args.compute_dtype) if lora else jnp.float32)
    # The step updates state["trained"]: all weights, or the adapters on the frozen base.
    state = sharding.init_state(mc, params, lora, jax.random.key(1))
    times = []
    for k, batch in enumerate(batches):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        loss = float(m["loss"])  # waits for the step
        times.append(time.perf_counter() - t0)
    if not math.isfinite(loss):
        raise RuntimeError(f"{name} {mode}: loss {loss}")
    n_dev = mesh.shape["fsdp"]
    stats = mesh.devices.flat[0].memory_stats() or {}
    rec = summarize(name, mode, mc, examples, plan, times[args.warmup:], range(args.warmup, len(times)),
                    peaks, n_dev)
    if lora:
        rec["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "targets": ",".join(lora.targets)}
    rec.update({"compile_s": round(compile_s, 2), "first_step_s": round(times[0], 3),
                "rows": plan["rows_per_step"], "seq_len": plan["seq_len"], "micro_batches": micro_batches,
                "remat": args.remat, "compute_dtype": args.compute_dtype, "step_memory_bytes": need,
                "device_peak_bytes": stats.get("peak_bytes_in_use"),
                "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    return rec


def time_jax(name, mc, examples, plan, args, peaks, mode, mesh=None, micro_batches=1):
    mesh = mesh or sharding.make_mesh()
    n_dev = mesh.shape["fsdp"]
    R = plan["rows_per_step"]
    if R % (n_dev * micro_batches):  # the rows of a step must split over the devices and micro-batches
        return emit({"config": name, "mode": mode, "skipped": f"{R} rows do not split over {n_dev} devices "
                                                               f"x {micro_batches} micro-batches"})
    lora = llama.LoraConfig(rank=args.lora_rank, alpha=float(args.lora_rank)) if mode == "lora" else None
    compiled = compile_jax(mc, examples, plan, args, mesh, micro_batches, lora)
    return emit(run_jax(name, mode, mc, examples, plan, args, peaks, mesh, *compiled,
                        micro_batches=micro_batches, lora=lora))


def summarize(name, mode, mc, examples, plan, times, step_ids, peaks, n_dev):
    """s_per_step is the median step time (robust to a busy machine); every rate is a total over the timed
    steps divided by their total time, so that steps holding more or fewer tokens weigh as they should."""
    cs = [counts(examples, plan, k) for k in step_ids]
    total_t = float(np.sum(times))
    tot = {key: float(np.sum([c[key] for c in cs])) for key in ("real", "loss", "slots", "examples")}
    flops = float(np.sum([llama.train_flops(mc, c["lengths"], frozen_weights=mode == "lora") for c in cs]))
    rec = {"config": name, "mode": mode, "params": n_params(mc),
           "examples_per_step": tot["examples"] / len(cs), "s_per_step": round(float(np.median(times)), 4),
           "loss_tokens_per_s": round(tot["loss"] / total_t, 1),
           "real_tokens_per_s": round(tot["real"] / total_t, 1),
           "token_slots_per_s": round(tot["slots"] / total_t, 1),
           "real_fraction": round(tot["real"] / tot["slots"], 4),
           "useful_tflops": round(flops / total_t / 1e12, 5), "devices": n_dev}
    return add_mfu(rec, peaks)


def add_mfu(rec, peaks, backend=None):
    """MFU of a record's useful FLOP/s against the peaks (FLOP/s per device; None: unknown) of its devices.
    Virtual CPU devices share the same cores: the measured peak is then the machine's, not one device's."""
    n = 1 if (backend or jax.default_backend()) == "cpu" else rec["devices"]
    for key in ("measured", "datasheet"):
        p = peaks.get(key)
        rec[f"mfu_vs_{key}"] = round(rec["useful_tflops"] * 1e12 / (n * p), 4) if p else None
    return rec


# ---------------------------------------------------------------------------------------------------------
# Hugging Face transformers + torch, Stanford Alpaca's recipe


def time_hf(name, mc, examples, plan, args, peaks):
    """LlamaForCausalLM + torch.optim.AdamW, Stanford's DataCollatorForSupervisedDataset: micro-batches of 4
    examples padded to their longest (labels -100 on prompt and padding), gradient accumulation over the
    step's examples, clip_grad_norm 1.0. Same examples as `plan` (batch_size a step). float32 weights and
    AdamW state; on a CUDA GPU with --compute_dtype bfloat16, bf16 autocast and TF32 (the HF Trainer's --bf16
    --tf32 of Stanford's command), else float32 throughout."""
    import torch
    import transformers
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = dev == "cuda" and args.compute_dtype == "bfloat16"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bf16
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    hc = transformers.LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
                                  intermediate_size=mc.intermediate_size,
                                  num_hidden_layers=mc.num_hidden_layers,
                                  num_attention_heads=mc.num_attention_heads,
                                  num_key_value_heads=mc.num_key_value_heads, head_dim=mc.head_dim,
                                  tie_word_embeddings=mc.tie_word_embeddings, rms_norm_eps=mc.rms_norm_eps,
                                  max_position_embeddings=mc.max_position_embeddings, pad_token_id=0)
    with torch.device(dev):  # random weights made where they are used
        model = transformers.LlamaForCausalLM(hc).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    tokens = examples["tokens"] % mc.vocab_size
    offsets, loss_start = examples["offsets"], examples["loss_start"]

    def micro_batches(ids):
        for j in range(0, len(ids), args.hf_micro_batch):
            chunk = ids[j:j + args.hf_micro_batch]
            longest = max(offsets[i + 1] - offsets[i] for i in chunk)
            inp = np.zeros((len(chunk), longest), np.int64)
            lab = np.full((len(chunk), longest), -100, np.int64)
            att = np.zeros((len(chunk), longest), np.int64)
            for r, i in enumerate(chunk):
                ids_i = tokens[offsets[i]:offsets[i + 1]]
                inp[r, :len(ids_i)], att[r, :len(ids_i)] = ids_i, 1
                lab[r, loss_start[i]:len(ids_i)] = ids_i[loss_start[i]:]
            yield (torch.from_numpy(inp).to(dev), torch.from_numpy(lab).to(dev),
                   torch.from_numpy(att).to(dev), longest * len(chunk))

    n_steps = args.warmup + args.steps
    times, slots = [], []
    for k in range(n_steps):
        ids = step_examples(plan, k)
        t0 = time.perf_counter()
        n_loss = sum(int(offsets[i + 1] - offsets[i] - loss_start[i]) for i in ids)
        s = 0
        for inp, lab, att, n_slots in micro_batches(ids):
            with torch.autocast(dev, torch.bfloat16, enabled=bf16):
                out = model(input_ids=inp, attention_mask=att, labels=lab)
            # HF's loss is the mean over the micro-batch's loss tokens; weight it to the step's mean.
            (out.loss * (lab[:, 1:] != -100).sum() / n_loss).backward()
            s += n_slots
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        slots.append(s)
    rec = summarize(name, "hf_torch", mc, examples, plan, times[args.warmup:], range(args.warmup, n_steps),
                    peaks, 1)
    slot_rate = float(np.sum(slots[args.warmup:])) / float(np.sum(times[args.warmup:]))
    real = rec["real_tokens_per_s"] * float(np.sum(times[args.warmup:]))  # real tokens of the timed steps
    rec.update({"token_slots_per_s": round(slot_rate, 1),
                "real_fraction": round(real / float(np.sum(slots[args.warmup:])), 4),
                "first_step_s": round(times[0], 3), "micro_batch": args.hf_micro_batch,
                "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
                "torch_threads": torch.get_num_threads(), "torch_device": dev, "bf16_autocast": bf16,
                "device_peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
                "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    # MFU of HF against the same jax-measured matmul peak (torch's fp32 matmul peak is the same on CPU).
    return emit(rec)


# ---------------------------------------------------------------------------------------------------------
# Packing efficiency and the 7B projection


def packing_table(examples, batch_size=128):
    lengths = alpaca.example_lengths(examples)
    out = []
    for T in (512, 1024, 2048, 4096):
        R = alpaca.choose_rows_per_step(lengths, batch_size=batch_size, seq_len=T)
        plan = alpaca.plan_steps(lengths, seed=0, rows_per_step=R, seq_len=T, epochs=1)
        st = alpaca.plan_stats(plan, lengths)
        out.append(emit({"packing": True, "seq_len": T, "rows_per_step": R,
                         "examples_per_step": st["examples_per_step"],
                         "steps_per_epoch": st["steps_per_epoch"],
                         "packing_efficiency": st["packing_efficiency"],
                         "padded_to_seq_len_efficiency": round(float(lengths.mean()) / T, 4)}))
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(lengths))
    # Stanford's collator: each example of a micro-batch of 4 padded to the micro-batch's longest.
    padded = np.concatenate([np.full(len(c), c.max())
                             for c in np.split(lengths[perm], range(4, len(perm), 4))])
    longest4 = float(lengths.sum()) / float(padded.sum())
    out.append(emit({"packing": False, "pad_to_longest_of_4_efficiency": round(longest4, 4)}))
    return out, padded


def projection(examples, pack_rows, padded, mfu):
    """Wall time of Stanford's recipe (Llama-2-7B, 3 epochs = 1218 steps of 128 examples) from the FLOPs that
    are computed: every token slot (padding included) and, in a packed row, every causal pair of the row
    (plain attention), not only those within examples. `padded`: the examples' lengths padded as Stanford's
    collator pads them."""
    mc = CONFIGS["llama2-7b"]
    lengths = alpaca.example_lengths(examples).astype(np.float64)
    steps, per_step = 1218, 128
    runs = steps * per_step / len(lengths)  # the run's examples, in multiples of the loaded ones
    hw = {"TPU v3-32": 32 * 61.5e12, "8xA100": 8 * 312e12}
    out = []
    for T, eff in pack_rows:
        flops = runs * lengths.sum() / eff / T * llama.train_flops(mc, [T])  # rows of the run x a full row's
        for hw_name, peak in hw.items():
            out.append({"recipe": f"packed, rows of {T}", "hardware": hw_name, "real_fraction": round(eff, 4),
                        "hours": round(flops / (peak * mfu) / 3600, 2)})
    flops = runs * llama.train_flops(mc, padded)
    for hw_name, peak in hw.items():
        out.append({"recipe": "padded to longest of 4 (Stanford)", "hardware": hw_name,
                    "real_fraction": round(lengths.sum() / padded.sum(), 4),
                    "hours": round(flops / (peak * mfu) / 3600, 2)})
    assumptions = (f"Llama-2-7B ({llama.matmul_weights(mc) / 1e9:.2f}e9 matmul parameters), {steps} steps x "
                   f"{per_step} examples "
                   f"(mean {lengths.mean():.1f} tokens), FLOPs = 6 x params x token slots + causal attention "
                   f"of each row; MFU {mfu:.0%} of the dense bf16 datasheet peak (TPU v3-32: 32 cores x 61.5 "
                   f"TFLOP/s; 8xA100: 8 x 312 TFLOP/s); no input pipeline, checkpoint or compile time. "
                   f"Published figures of the padded recipe: ~3.5 h (Llama 1) and ~9 h (Llama 2), at a far "
                   f"lower MFU: compare the ratios, not the hours.")
    for r in out:
        emit({"projection": True, **r, "assumed_mfu": mfu})
    return out, assumptions


# ---------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,100m", help=f"comma-separated, from {list(CONFIGS)}")
    p.add_argument("--seq_len", type=int, default=512,
                   help="packed row length (and --no_pack padding length)")
    p.add_argument("--batch_size", type=int, default=0,
                   help="examples per step; 0 = per config: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH.items()))
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps per measurement (s/step: their median; rates: totals over total time)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--modes", default="",
                   help="which of packed, no_pack, hf, lora to run; '' = packed,no_pack,hf for tiny, "
                        "packed,hf for the others. lora: the LoRA step on the packed rows (compared with "
                        "packed: the same model and batch)")
    p.add_argument("--lora_rank", type=int, default=8,
                   help="rank of the lora mode (alpha = rank, all seven matrices)")
    p.add_argument("--remat", choices=("on", "off"), default="on",
                   help="jax.checkpoint per layer, as alpaca.py trains (on); off saves the recompute where "
                        "memory allows")
    p.add_argument("--compute_dtype", default="",
                   help="'' = float32 on CPU (bf16 is no faster there), bfloat16 elsewhere")
    p.add_argument("--hf_micro_batch", type=int, default=4, help="Stanford's per_device_train_batch_size")
    p.add_argument("--assume_mfu", type=float, default=0.4, help="MFU assumed by the 7B projection")
    p.add_argument("--cache_dir", default=os.path.join(ROOT, ".cache"))
    p.add_argument("--data", default=SAMPLE,
                   help="Alpaca records (path or URL); Stanford's alpaca_data.json for the real lengths; "
                        "default: the 2,000-record sample in tests/assets")
    args = p.parse_args(argv)
    if not args.compute_dtype:
        args.compute_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"

    t_start = time.time()
    import jaxlib
    dev = jax.devices()[0]
    env = emit({"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
                "devices": jax.device_count(), "date": datetime.date.today().isoformat(),
                "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
                "load_average_1min": round(os.getloadavg()[0], 2), "args": vars(args)})
    examples, info = load_examples(args.data, args.cache_dir)
    emit({"examples": info})
    peaks = {"measured": matmul_peak(jnp.dtype(args.compute_dtype)),
             "datasheet": datasheet_peak(args.compute_dtype)}
    emit({"matmul_peak_tflops_measured": round(peaks["measured"] / 1e12, 4), "dtype": args.compute_dtype,
          "datasheet_peak_tflops": peaks["datasheet"] and peaks["datasheet"] / 1e12})

    results = []
    for name in args.configs.split(","):
        mc = dataclasses.replace(CONFIGS[name], max_position_embeddings=max(args.seq_len, 2048))
        bs = args.batch_size or DEFAULT_BATCH.get(name, 8)
        modes = (args.modes or DEFAULT_MODES.get(name, "packed,hf")).split(",")
        packed, padded = step_plans(examples, batch_size=bs, seq_len=args.seq_len,
                                    steps=args.warmup + args.steps)
        if "packed" in modes:
            results.append(time_jax(name, mc, examples, packed, args, peaks, "packed"))
        if "lora" in modes:
            results.append(time_jax(name, mc, examples, packed, args, peaks, "lora"))
        if "no_pack" in modes:
            results.append(time_jax(name, mc, examples, padded, args, peaks, "no_pack"))
        if "hf" in modes:
            try:
                import torch  # noqa: F401
                import transformers  # noqa: F401
            except ImportError:
                emit({"config": name, "mode": "hf_torch", "skipped": "torch/transformers not installed"})
            else:
                results.append(time_hf(name, mc, examples, padded, args, peaks))

    # The peak again, and the better of the two: a busy machine during one of them only lowers it.
    again = matmul_peak(jnp.dtype(args.compute_dtype))
    emit({"matmul_peak_tflops_measured_at_end": round(again / 1e12, 4)})
    if again > peaks["measured"]:
        peaks["measured"] = again
        for r in results:
            if "skipped" not in r:
                add_mfu(r, peaks)
    pack_rows, padded4 = packing_table(examples)
    longest4 = pack_rows[-1]["pad_to_longest_of_4_efficiency"]
    proj, assumptions = projection(examples, [(r["seq_len"], r["packing_efficiency"]) for r in pack_rows[:-1]
                                              if r["seq_len"] in (512, 2048)], padded4, args.assume_mfu)

    # ------------------------------------------------------------------ the table
    print(f"\n{env['date']}  {env['device']} x{env['devices']} ({env['backend']}, {env['cores']} cores), jax "
          f"{env['jax']}, {args.compute_dtype}, remat {args.remat}; examples: {info['data_note']}; "
          f"measured matmul peak {peaks['measured'] / 1e9:.0f} GFLOP/s per device (best of start and end); "
          f"load avg at start {env['load_average_1min']}, at end {os.getloadavg()[0]:.2f}")
    hdr = f"{'config':7} {'mode':9} {'ex/step':>7} {'s/step':>8} {'loss tok/s':>10} {'real tok/s':>10} " \
          f"{'slots/s':>9} {'real %':>6} {'MFU':>6} {'compile s':>9} {'memory MB':>9}"
    print(hdr)
    for r in results:
        if "skipped" in r:
            print(f"{r['config']:7} {r['mode']:9} skipped: {r['skipped']}")
            continue
        mem = r.get("step_memory_bytes") or r.get("process_max_rss_bytes")
        print(f"{r['config']:7} {r['mode']:9} {r['examples_per_step']:7.1f} {r['s_per_step']:8.3f} "
              f"{r['loss_tokens_per_s']:10,.0f} {r['real_tokens_per_s']:10,.0f} "
              f"{r['token_slots_per_s']:9,.0f} "
              f"{100 * r['real_fraction']:5.1f}% {100 * r['mfu_vs_measured']:5.1f}% "
              f"{r.get('compile_s', float('nan')):9.1f} {mem / 2**20:9.0f}")
    by = {(r["config"], r["mode"]): r for r in results if "skipped" not in r}
    for name in args.configs.split(","):
        pk = by.get((name, "packed"))
        for other in ("no_pack", "hf_torch"):
            o = by.get((name, other))
            if pk and o:
                rates = ("loss_tokens_per_s", "real_tokens_per_s")
                ratio = emit({"config": name, "ratio": f"packed / {other}",
                              **{k: round(pk[k] / o[k], 2) for k in rates}})
                print(f"{name}: packed is {ratio['loss_tokens_per_s']:.2f}x {other} in loss tokens/s, "
                      f"{ratio['real_tokens_per_s']:.2f}x in real tokens/s")
        lo = by.get((name, "lora"))
        if pk and lo:
            ratio = emit({"config": name, "ratio": "lora / packed",
                          "s_per_step": round(lo["s_per_step"] / pk["s_per_step"], 3)})
            print(f"{name}: a LoRA step (rank {args.lora_rank}, all seven matrices) takes "
                  f"{ratio['s_per_step']:.2f}x the time of a full fine-tune step on the same rows "
                  "(median s/step)")
    print("\npacking (alpaca.py planner, 128 examples a step): " + "; ".join(
        f"{r['seq_len']}: {r['rows_per_step']} rows, {100 * r['packing_efficiency']:.1f}% real"
        for r in pack_rows[:-1]) + f"; Stanford's pad to longest of 4: {100 * longest4:.1f}% real")
    print("\nprojection of the full recipe: " + "; ".join(f"{r['recipe']} on {r['hardware']}: {r['hours']} h"
                                                         for r in proj))
    print(f"  assumptions: {assumptions}")

    for name in args.configs.split(","):
        pk, hf = by.get((name, "packed")), by.get((name, "hf_torch"))
        if pk and hf:
            ratio = pk["loss_tokens_per_s"] / hf["loss_tokens_per_s"]
            print(f"{name}: packed loss tokens/s are {ratio:.2f}x HF/PyTorch's with Stanford's collator")
    print(f"\nbenchmark took {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
