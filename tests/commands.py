"""The short training command that tests/test_train.py, tests/test_lora.py and tests/test_multihost.py run in
subprocesses: the real stories260K model on 48 real Alpaca records, 6 float32 steps of 8 rows x 256 tokens,
rows planned for 8 devices whatever the layout (1 x 8, 2 x 4 or 1 x 1), so every layout trains on the same
batches. Every subprocess runs with FAULTS on its PYTHONPATH: renaming a directory fails there, as on a Cloud
Storage FUSE mount, so every training, checkpoint, resume, pruning and export of the tests is done without; and
CRASH_AT=... in its environment kills it at a given moment (see faults/sitecustomize.py). run_in_namespace runs
one on a file system of its own (a full disk, say)."""

import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "tests", "assets")
STORIES = os.path.join(ASSETS, "stories260K")
SAMPLE = os.path.join(ASSETS, "alpaca", "alpaca_sample_2000.json")
STEPS = 6
FAULTS = os.path.join(ROOT, "tests", "faults")  # its sitecustomize.py refuses directory renames, injects crashes


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
    env["PYTHONPATH"] = FAULTS
    # The same program compiles once for all subprocesses of the test session.
    env["JAX_COMPILATION_CACHE_DIR"] = str(workdir.parent / "jax-cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.update(extra)
    return env


def start(args, env, stderr=subprocess.STDOUT):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "alpaca.py"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def run(args, env, timeout=300):
    p = start(args, env)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def committed(out):
    """The checkpoint directories of a run that carry the commit marker (meta.json)."""
    root = os.path.join(out, "checkpoints")
    return sorted(d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "meta.json")))


@functools.lru_cache(maxsize=None)
def namespace_problem():
    """Why run_in_namespace cannot work here ('' when it can): `unshare -rm` (new user and mount namespaces,
    this user root in them) may be missing or forbidden (some containers; AppArmor on Ubuntu 24.04)."""
    d = tempfile.mkdtemp()
    try:
        p = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', d],
                           capture_output=True, text=True, timeout=60)
        return "" if p.returncode == 0 else f"`unshare -rm` with a tmpfs mount fails here: {p.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare -rm` cannot run here: {e}"
    finally:
        os.rmdir(d)


def run_in_namespace(setup, args, env, timeout=300):
    """run(args, env) in a private mount namespace, after the shell commands `setup` (e.g. mount a tmpfs and
    fill it): what they mount, and what is written there, only this run sees, and it goes when the run ends."""
    script = f'{setup} && exec "$@"'
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, os.path.join(ROOT, "alpaca.py"),
                        *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout


def q(path):
    """A path quoted for the shell."""
    return shlex.quote(str(path))
