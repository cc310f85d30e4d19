"""benchmarks/memory_plan.py: XLA's compiled figure of the real train step per device, its parts, how it
grows, and the fixes it suggests when a device is too small; --target: the machines it knows, a missing
compiler, and (where libtpu or the CUDA plugin is installed) the TPU's and GPU's own compilers, a step the
TPU compiler refuses, the usable HBM it counts. stories260K's config.json alone (no weights) on the
2,000-record sample; the compiles are cached in one directory that every test here shares."""

import dataclasses
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import alpaca
from commands import ROOT, SAMPLE, STORIES

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory_plan  # noqa: E402

SCRIPT = os.path.join(ROOT, "benchmarks", "memory_plan.py")
FLAGS = {"seq_len": 256, "max_len": 256, "batch_size": 16, "data_parallel": 8}  # 16 rows: 2 a device


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    model = d / "config-only"
    model.mkdir()
    shutil.copy(os.path.join(STORIES, "config.json"), model)  # no weights: the plan never reads them
    c = alpaca.Config(model=str(model), tokenizer=os.path.join(STORIES, "tokenizer.model"), data=SAMPLE,
                      cache_dir=str(d / "cache"), **FLAGS)
    return c, {}


def plan(setup, **changes):
    """plan_run's (info, plan) of the flags with these changes, computed once per module."""
    c, done = setup
    key = json.dumps(changes, sort_keys=True)
    if key not in done:
        done[key] = memory_plan.plan_run(dataclasses.replace(c, **changes))
    return done[key]


def test_the_command_prints_the_plan_for_a_person_and_in_the_json_line(setup):
    c, _ = setup
    base = plan(setup)[1]
    cmd = [sys.executable, SCRIPT, "--model", c.model, "--tokenizer", c.tokenizer, "--data", c.data,
           "--cache_dir", c.cache_dir] + [f"--{k}={v}" for k, v in FLAGS.items()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)  # stdout is the one JSON line
    assert stats["rows_per_step"] % 8 == 0 and stats["steps"] == 3 * stats["steps_per_epoch"]
    assert stats["memory"]["total"] == base["total"]  # the same figure, from the cache
    assert "compiling" not in out.stderr
    assert "memory per device at the peak of a step: 8 devices" in out.stderr
    assert "compiler: XLA:CPU estimate" in out.stderr and stats["memory"]["compiler"] == "XLA:CPU estimate"
    assert "v3 (16.62 GB) yes" in out.stderr  # on CPU, with no --device_memory_gb: common devices


def test_parts_add_up_to_xla_total(setup):
    c, _ = setup
    p = plan(setup)[1]
    _, mc, lc = alpaca.model_config(c, weights=False)
    eight = memory_plan.Target("", "cpu", 8)  # the XLA:CPU estimate on 8 virtual devices
    raw = memory_plan.compiled_memory(c, mc, lc, eight, p["rows"], p["micro_batches"])
    assert p["total"] == raw["arguments"] + raw["temporaries"] + raw["outputs"] - raw["aliased"]
    parts = [k for k in p if k in ("parameters", "adamw_moments", "batch_and_step_count", "gradients",
                                   "activations_and_other_temporaries", "outputs_not_aliased")]
    assert len(parts) == 6 and sum(p[k] for k in parts) == p["total"]
    n = 260_032  # stories260K's parameters, float32, split over 8 devices
    assert (p["parameters"], p["adamw_moments"], p["gradients"]) == (n // 8 * 4, n // 8 * 8, n // 8 * 4)
    batch = p["rows"] // 8 * p["seq_len"] * 5 * 4  # this device's rows of the five int32/float32 arrays
    assert batch <= p["batch_and_step_count"] <= batch + 16
    assert p["activations_and_other_temporaries"] > 0


def test_longer_rows_or_fewer_devices_need_more_memory(setup):
    base = plan(setup)[1]
    assert plan(setup, seq_len=512)[1]["total"] > 1.2 * base["total"]
    more = plan(setup, data_parallel=16)[1]  # also what the fix below compiles: 8 devices are the fewer
    assert base["parameters"] == 2 * more["parameters"] and base["total"] > 1.5 * more["total"]


def test_too_small_a_device_gets_flags_that_the_planner_says_fit(setup):
    base = plan(setup)[1]
    half = base["rows"] // 2
    split = plan(setup, micro_batch_size=half)[1]  # two passes of half the rows: less activation memory
    assert split["micro_batches"] == 2 and split["total"] < base["total"]
    limit = (base["total"] + split["total"]) / 2 / 1e9
    p = plan(setup, device_memory_gb=limit)[1]
    assert p["fits"] is False and math.isclose(p["device_memory_gb"], limit)
    assert p["device_memory_of"] == "--device_memory_gb"
    assert any(f["changes"] == {"micro_batch_size": half} for f in p["fixes"]), p["fixes"]
    for fix in p["fixes"]:
        assert fix["total"] <= limit * 1e9
        again = plan(setup, device_memory_gb=limit, **fix["changes"])[1]
        assert again["fits"] is True and again["total"] == fix["total"]
    text = memory_plan.format_memory_plan(p)
    assert "does NOT fit" in text and f"fits with --micro_batch_size {half}" in text
    assert math.isclose(plan(setup, device_memory_gb=100.0)[1]["total"], base["total"])
    assert plan(setup, device_memory_gb=100.0)[1]["fits"] is True


def test_device_memory_defaults_to_what_jax_can_use_on_known_devices(monkeypatch):
    from types import SimpleNamespace as Device
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
    gb = lambda kind: round((memory_plan.local_device_memory(Device(device_kind=kind)) or 0) / 1e9, 3)  # noqa
    assert (gb("TPU v3"), gb("TPU v5 lite")) == (16.624, 16.909)  # usable HBM, as libtpu counts it
    assert gb("NVIDIA A100-SXM4-40GB") == round(42.331 * 0.75, 3)  # what JAX takes of the GPU
    assert gb("NVIDIA A100-SXM4-80GB") == round(85.100 * 0.75, 3)
    assert gb("cpu") == 0
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    assert gb("NVIDIA H200") == round(151.398 * 0.95, 3)


def test_lora_plan_holds_the_frozen_base_and_replicated_adapters_and_is_smaller(setup):
    import llama
    c, _ = setup
    full = plan(setup)[1]
    lora = plan(setup, lora_rank=2, param_dtype="bfloat16")[1]  # --lora_rank's default base dtype
    mc = alpaca.model_config(c, weights=False)[1]
    n = sum(math.prod(s) for s in jax.tree.leaves(llama.lora_shapes(mc, llama.LoraConfig(rank=2, alpha=8.0)),
                                                  is_leaf=lambda s: isinstance(s, tuple)))
    assert (lora["adamw_moments"], lora["gradients"]) == (n * 8, n * 4)  # float32, on every device
    assert lora["parameters"] == full["parameters"] // 2 + n * 4  # the bfloat16 base shard and the adapters
    assert lora["total"] < full["total"]


def test_a_device_count_that_cannot_split_the_model_is_refused_before_any_compile(setup):
    with pytest.raises(alpaca.InputError, match="hidden_size \\(64\\) cannot be split over 48 devices"):
        plan(setup, data_parallel=48)


# --target: machines as JAX on them sees them, compiled for by their own compilers.

def test_targets_are_machines_as_jax_on_them_sees_them():
    t = memory_plan.target
    assert (t("v3-8").devices, t("v3-8").topology) == (8, "v3:2x2")  # 4 chips of 2 TensorCores
    assert (t("v4-8").devices, t("v5p-8").devices) == (4, 4)  # megacore: a chip is one device
    assert (t("v5e-1").devices, t("v3-32").devices) == (1, 32)
    assert (t("h100-x8").topology, t("h100-x16").topology, t("l4-x1").devices) == ("1x1x8", "1x2x8", 1)
    with pytest.raises(alpaca.InputError, match="--target h100-x3: unknown; known targets: v3-8, v3-32"):
        t("h100-x3")


def test_an_unknown_target_or_flags_that_do_not_match_it_exit_2_naming_the_flag(setup, capsys):
    c, _ = setup
    base = ["--model", c.model, "--tokenizer", c.tokenizer, "--data", c.data, "--cache_dir", c.cache_dir]
    assert memory_plan.main(["--target", "v9-8", *base]) == 2
    err = capsys.readouterr().err
    assert "--target v9-8: unknown; known targets: v3-8," in err and "h100|h200|l4}-x{1|2|4|8" in err
    assert "Traceback" not in err
    assert memory_plan.main(["--target", "v5e-32", "--data_parallel", "16", *base]) == 2
    assert "--data_parallel 16: --target v5e-32 has 32 devices, so it must be 0 or a multiple of 32" in \
        capsys.readouterr().err


def test_help_lists_the_targets_and_what_they_need(capsys):
    with pytest.raises(SystemExit) as e:
        memory_plan.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "v3-8, v3-32" in out and "v6e-8" in out
    assert "{a100-40gb|a100-80gb|h100|h200|l4}-x{1|2|4|8|16|32}" in out
    assert 'pip install "jax[tpu]==0.10.2"' in out and 'pip install "jax[cuda13]==0.10.2"' in out


@pytest.mark.parametrize("name, pip", [("v3-8", 'pip install "jax[tpu]==0.10.2"'),
                                       ("a100-80gb-x8", 'pip install "jax[cuda13]==0.10.2"')])
def test_without_the_target_compiler_one_line_names_the_pip_command(setup, capsys, monkeypatch, name, pip):
    def not_installed(dist):
        raise importlib.metadata.PackageNotFoundError(dist)
    monkeypatch.setattr(memory_plan.importlib.metadata, "version", not_installed)
    c, _ = setup
    flags = ["--target", name, "--model", c.model, "--data", c.data, "--cache_dir", c.cache_dir]
    status = memory_plan.main(flags)
    captured = capsys.readouterr()
    assert status == 1 and captured.out == ""
    assert captured.err.count("\n") == 1 and pip in captured.err and "Traceback" not in captured.err


def installed(dist):
    try:
        return bool(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return False


needs_libtpu = pytest.mark.skipif(not installed("libtpu"),
                                  reason='needs libtpu, the TPU compiler (pip install "jax[tpu]==0.10.2")')


@needs_libtpu
def test_a_step_the_tpu_compiler_refuses_is_a_verdict_and_the_fix_is_one_it_accepts(setup):
    """One v5e chip, 7001 rows of 256 tokens in one pass: the float32 logits alone are ~18 GiB, and the TPU
    compiler refuses the step. The planner says so, and its fix (7001 is prime: one row a pass, the only
    split) compiles for the same chip and fits."""
    c, _ = setup
    cmd = [sys.executable, SCRIPT, "--target", "v5e-1", "--model", c.model, "--tokenizer", c.tokenizer,
           "--data", c.data, "--cache_dir", c.cache_dir, "--no_pack", "--batch_size", "7001", "--seq_len",
           "256", "--max_len", "256", "--steps", "1", "--lora_rank", "2"]  # LoRA: no third compile to try it
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    p = json.loads(out.stdout)["memory"]
    assert p["compiler"].startswith("TPU (libtpu ") and p["fits"] is False
    assert re.match(r"RESOURCE_EXHAUSTED: .*HLO temporaries \([\d.]+G\) exceeds available HBM \(15.75G\)",
                    p["refused"]), p["refused"]
    assert p["device_memory_bytes"] == memory_plan.TPU_HBM["v5e"]
    assert "the compiler refused the step: RESOURCE_EXHAUSTED" in out.stderr and "does NOT fit" in out.stderr
    assert [f["changes"] for f in p["fixes"]] == [{"micro_batch_size": 1}]
    assert p["fixes"][0]["total"] <= p["device_memory_bytes"]
    assert "fits with --micro_batch_size 1" in out.stderr


@needs_libtpu
def test_the_usable_hbm_in_the_table_is_what_the_tpu_compiler_allows():
    """A program whose output is exactly TPU_HBM[chip] bytes compiles for one device of that chip; one
    MiB more is refused. The planner compares every TPU figure with these numbers."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to lock
    for chip, usable in memory_plan.TPU_HBM.items():
        name = next(n for n in memory_plan.TPUS if n.startswith(f"{chip}-"))
        device = memory_plan.target_devices(memory_plan.target(name))[0]

        def fits(nbytes):
            s = jax.sharding.SingleDeviceSharding(device)
            step = jax.jit(lambda x: jnp.zeros((nbytes // 4,), jnp.float32) + x, out_shardings=s)
            try:
                step.lower(jax.ShapeDtypeStruct((), jnp.float32, sharding=s)).compile()
                return True
            except jax.errors.JaxRuntimeError as e:
                assert "RESOURCE_EXHAUSTED" in str(e)
                return False
        assert fits(usable) and not fits(usable + 2**20), chip


@pytest.mark.skipif(not installed("jax-cuda13-plugin"),
                    reason='needs JAX\'s CUDA plugin (pip install "jax[cuda13]==0.10.2"), too big for CI')
def test_a_gpu_target_is_compiled_by_the_cuda_compiler_without_a_gpu(setup, monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
    info, p = memory_plan.plan_run(dataclasses.replace(setup[0], data_parallel=0), "l4-x8")
    assert p["compiler"].startswith("CUDA (deviceless, jax-cuda13-plugin ") and p["devices"] == 8
    assert p["device_memory_bytes"] == int(0.75 * 24e9) and p["fits"] is True
    assert p["fits_at_mem_fraction_0.95"] is True and p["gpu_memory_bytes"] == 24e9
    n = 260_032  # stories260K's float32 parameters, split over the 8 GPUs
    assert (p["parameters"], p["adamw_moments"]) == (n // 8 * 4, n // 8 * 8)
