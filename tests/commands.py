"""The short training command that tests/test_train.py, tests/test_lora.py and tests/test_multihost.py run in
subprocesses: the real stories260K model on 48 real Alpaca records, 6 float32 steps of 8 rows x 256 tokens,
rows planned for 8 devices whatever the layout (1 x 8, 2 x 4 or 1 x 1), so every layout trains on the same
batches."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "tests", "assets")
STORIES = os.path.join(ASSETS, "stories260K")
SAMPLE = os.path.join(ASSETS, "alpaca", "alpaca_sample_2000.json")
STEPS = 6


def write_data(workdir, n=48):
    json.dump(json.load(open(SAMPLE))[:n], open(workdir / "data.json", "w"))


def run_args(workdir, out, *extra):
    return ["--model", STORIES, "--data", str(workdir / "data.json"), "--cache_dir", str(workdir / "cache"),
            "--out", str(out), "--steps", str(STEPS), "--batch_size", "8", "--seq_len", "256", "--max_len", "256",
            "--lr", "1e-3", "--warmup_ratio", "0.2", "--compute_dtype", "float32", "--hf_dtype", "float32",
            "--data_parallel", "8", "--log_every", "1", "--checkpoint_every", "2", "--keep_checkpoints", "2", *extra]


def logged_step(line):
    """The step of a metrics.jsonl line; -1 for a line the run is still writing."""
    try:
        return json.loads(line)["step"]
    except ValueError:
        return -1


def env_for(devices, workdir, **extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["HF_HUB_OFFLINE"] = "1"
    # The same program compiles once for all subprocesses of a test module.
    env["JAX_COMPILATION_CACHE_DIR"] = str(workdir / "jax-cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.update(extra)
    return env


def start(args, env):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "alpaca.py"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(args, env, timeout=300):
    p = start(args, env)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out
