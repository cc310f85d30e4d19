"""benchmarks/accelerator.py --small on CPU: the whole accelerator benchmark runs to the end and reports every
figure with sane values, so that it is known to work before any accelerator time is spent on it. One run is
checked many ways; a second runs only the single-device part under a memory limit it cannot meet."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "accelerator.py")
JAX_MODES = {"packed, remat on", "packed, remat off", "no_pack (pad 256)", "one device"}


def run(tmp, *extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", JAX_COMPILATION_CACHE_DIR=str(tmp / "jax-cache"),  # the 7b part compiles
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")                         # what packed did
    p = subprocess.run([sys.executable, SCRIPT, "--small", "--steps", "1", "--cache_dir", str(tmp), *extra],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout, [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accelerator")
    out, recs = run(tmp)
    return tmp, out, recs, next(r for r in recs if r.get("summary"))


def test_every_run_reports_sane_rates_mfu_and_memory(small):
    _, _, _, s = small
    assert not s["failed"]
    assert s["env"]["backend"] == "cpu" and s["env"]["compute_dtype"] == "float32"
    assert "tests/assets" in s["env"]["examples"]["data"]  # the sample, and it says so
    # No datasheet peak for a CPU.
    assert 0 < s["matmul_peak_tflops_measured"] and s["datasheet_peak_tflops"] is None
    runs = {r["mode"]: r for r in s["runs"]}
    assert set(runs) == JAX_MODES | {"hf_torch"}
    for mode, r in runs.items():
        assert r["s_per_step"] > 0 and r["real_tokens_per_s"] > 0 and r["loss_tokens_per_s"] > 0, mode
        assert r["real_tokens_per_s"] > r["loss_tokens_per_s"] and r["useful_tflops"] > 0, mode
        assert 0 < r["mfu_vs_measured"] <= 1 and r["mfu_vs_datasheet"] is None, mode
        if mode in JAX_MODES:
            assert r["fits"] and r["compile_s"] > 0 and r["step_memory_bytes"] > 0, mode
    # Packing fills rows with real tokens; padding every example to 256 does not; Stanford's collator is
    # between.
    assert runs["packed, remat on"]["real_fraction"] > 0.9 > runs["hf_torch"]["real_fraction"] \
        > runs["no_pack (pad 256)"]["real_fraction"]
    # Without remat the step keeps every layer's activations: more memory.
    assert runs["packed, remat off"]["step_memory_bytes"] > runs["packed, remat on"]["step_memory_bytes"]


def test_single_device_part_projects_the_recipe(small):
    _, _, _, s = small
    fit = s["fit_on_one_device"]
    assert fit["full_fits"] and fit["memory_limit_bytes"] is None  # a CPU reports no memory limit
    assert fit["full_step_memory_bytes"] > 0 and fit["full_misses_by_bytes"] is None
    run = next(r for r in s["runs"] if r["mode"] == "one device")
    assert run["devices"] == 1 and fit["s_per_step"] == run["s_per_step"]
    # 3 epochs of 52,002 examples at ~16 a step (the stand-in's batch).
    assert 3 * 52_002 / 16 <= fit["recipe_steps"] <= 3 * 52_002 / 12
    assert fit["projected_hours"] == pytest.approx(fit["recipe_steps"] * fit["s_per_step"] / 3600, abs=0.01)


def test_table_lists_every_run(small):
    _, out, _, s = small
    table = out[out.index("MFU meas"):]
    for r in s["runs"]:
        assert r["mode"] in table
    assert "7b-standin on one device" in table and "fits" in table


def test_a_step_over_the_memory_limit_is_not_run_and_a_smaller_setting_is(small):
    tmp, _, _, s = small
    need = s["fit_on_one_device"]["full_step_memory_bytes"]
    limit = int(0.9 * need)
    _, recs = run(tmp, "--part", "7b", "--memory_limit_gb", str(limit / 1e9))
    first = next(r for r in recs if r.get("mode") == "one device")
    assert first["micro_batches"] == 1 and not first["fits"] and "s_per_step" not in first
    assert "GB" in first["why"]
    fit = next(r for r in recs if "fit_on_one_device" in r)
    best = fit["largest_fit"]  # one row per micro-batch, or fewer layers: within the limit, and it ran
    assert best["step_memory_bytes"] <= limit and best["s_per_step"] > 0
    assert (best["micro_batches"], best["layers"]) != (1, 5)
    if best["layers"] == 5:  # the full model fits with more micro-batches: the recipe is projected
        assert fit["full_fits"] and fit["full_micro_batches"] > 1 and fit["projected_hours"] > 0
    else:
        assert not fit["full_fits"] and fit["full_misses_by_bytes"] > 0 and "projected_hours" not in fit


def test_train_flops_counts_query_heads_for_attention_and_kv_heads_for_weights():
    c = llama.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    shapes = llama.param_shapes(c)["layers"]
    matrices = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    matmul = sum(int(np.prod(shapes[k])) for k in matrices) + 64 * 100
    assert llama.matmul_weights(c) == matmul
    # Two examples, 3 tokens (6 causal pairs) and 1 token (1 pair). A pair costs 2 matmuls x 2 FLOPs x H E per
    # layer forward, 3 times that with the backward; kv heads (2) do not enter.
    assert llama.train_flops(c, [3, 1]) == 6 * matmul * 4 + 3 * (2 * 2 * 8 * 8) * 3 * 7
