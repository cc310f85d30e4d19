"""How long a checkpoint stalls training, written synchronously and in the background, in one run.

    .venv/bin/python benchmarks/checkpoint.py                      # ~100M on CPU, about 2 minutes on 2 cores
    .venv/bin/python benchmarks/checkpoint.py --out /mnt/gcs/bench # the storage a pod would write to

The real FSDP train step (alpaca.make_step, AdamW) of a config of bench.py on random weights and random
tokens (--rows rows of 512 tokens a step; the stall does not depend on the data, so none is read), then
--checkpoints rounds of:
  a plain step;
  sync   alpaca.Checkpointer.save(wait=True), as the training loop writes its last checkpoint: the whole
         write (files, fsync, commit, pruning) before the next step;
  a plain step;
  async  Checkpointer.save (the copy of the slices to host memory), steps until the background write has
         finished, then Checkpointer.poll (the commit).
The stall of a checkpoint is how long the training loop waits for it: the whole write's time written
synchronously; the copy plus the commit written in the background. Reported apart: how long the steps
that ran beside the writer thread took against the plain steps of the same rounds (on a CPU the thread
and the step share the cores). One JSON line per round, then a summary with medians. Also printed: the
host memory a background write holds for Llama-2-7B.
"""

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402

import alpaca  # noqa: E402
import sharding  # noqa: E402
from bench import CONFIGS, emit, n_params  # noqa: E402


def saved(state):
    """What a checkpoint holds of the training state (alpaca.SAVED: the trained weights and AdamW's state)."""
    return {k: state[k] for k in alpaca.SAVED}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="100m", help=f"one of {list(CONFIGS)}")
    p.add_argument("--rows", type=int, default=1, help="rows of 512 tokens a step")
    p.add_argument("--checkpoints", type=int, default=3,
                   help="checkpoints of each kind (the median is reported)")
    p.add_argument("--out", default="",
                   help="where to write ('' = a temporary directory, removed at the end)")
    args = p.parse_args(argv)

    mc, mesh = CONFIGS[args.config], sharding.make_mesh()
    R, T = args.rows * mesh.shape["fsdp"], 512
    tokens = np.random.default_rng(0).integers(0, mc.vocab_size, (R, T + 1), dtype=np.int32)
    batch = sharding.shard_batch({"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                                  "loss_mask": np.ones((R, T), np.float32),
                                  "segment_ids": np.ones((R, T), np.int32),
                                  "positions": np.tile(np.arange(T, dtype=np.int32), (R, 1))}, mesh)
    params = sharding.init_sharded_params(mc, jax.random.key(0), mesh)
    now = {"state": sharding.init_state(mc, params)}  # what the latest step returned
    del params  # the state holds them, and the step donates it
    step_fn = alpaca.make_step(alpaca.Config(compute_dtype="float32"), mc, None, mesh, 10_000, 1)
    out = args.out or tempfile.mkdtemp(prefix="checkpoint-bench-")
    checkpoints = alpaca.Checkpointer(out, {}, keep=1)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(saved(now["state"])))
    emit({"config": args.config, "parameters": n_params(mc), "checkpoint_bytes": nbytes,
          "devices": jax.device_count(), "rows": R, "seq_len": T, "out": out, "cores": os.cpu_count(),
          "jax": jax.__version__, "load_average_1min": round(os.getloadavg()[0], 2)})

    def step():
        t0 = time.perf_counter()
        now["state"], m = step_fn(now["state"], batch)
        float(m["loss"])  # waits for the step
        return time.perf_counter() - t0

    step()  # compiles
    rounds = []
    for k in range(args.checkpoints):
        plain = [step()]
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # its progress line; stdout is for the JSON lines
            checkpoints.save(2 * k + 1, saved(now["state"]), wait=True)
        sync = time.perf_counter() - t0

        plain.append(step())
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            checkpoints.save(2 * k + 2, saved(now["state"]))
        copy = time.perf_counter() - t0
        beside = []
        while not checkpoints.pending[1].done():
            beside.append(step())
        t0 = time.perf_counter()
        checkpoints.poll()
        commit = time.perf_counter() - t0
        rounds.append(emit({"sync_stall_s": round(sync, 3), "async_stall_s": round(copy + commit, 3),
                            "copy_s": round(copy, 3), "commit_s": round(commit, 3),
                            "plain_steps_s": [round(t, 3) for t in plain],
                            "steps_beside_the_write_s": [round(t, 3) for t in beside]}))
    if not args.out:
        shutil.rmtree(out)

    sync_s, async_s = (round(float(np.median([r[k] for r in rounds])), 3)
                       for k in ("sync_stall_s", "async_stall_s"))
    plain_s = float(np.mean([t for r in rounds for t in r["plain_steps_s"]]))
    beside_s = float(np.mean([t for r in rounds for t in r["steps_beside_the_write_s"]] or [np.nan]))
    seven_b = n_params(CONFIGS["llama2-7b"]) * 12  # float32 parameters + AdamW's two moments
    emit({"sync_stall_s": sync_s, "async_stall_s": async_s, "ratio": round(async_s / sync_s, 3),
          "plain_step_s": round(plain_s, 3), "step_beside_the_write_s": round(beside_s, 3),
          "llama2_7b_checkpoint_bytes": seven_b, "llama2_7b_host_copy_bytes_per_host_v3_32": seven_b // 4,
          "load_average_1min": round(os.getloadavg()[0], 2)})
    print(f"\n{args.config} ({nbytes / 1e9:.2f} GB of parameters and AdamW state): a checkpoint stalls "
          f"training {sync_s:.2f} s written synchronously, {async_s:.2f} s in the background "
          f"({100 * async_s / sync_s:.0f}%; medians of {args.checkpoints}). Steps beside a background write: "
          f"{beside_s:.2f} s on average, plain steps {plain_s:.2f} s. Llama-2-7B: {seven_b / 1e9:.0f} GB a "
          f"checkpoint, {seven_b / 4e9:.1f} GB of host memory per host on a v3-32 (4 hosts) for a background "
          "write.")


if __name__ == "__main__":
    main()
