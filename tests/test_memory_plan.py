"""benchmarks/memory_plan.py: XLA's compiled figure of the real train step per device, its parts, how it
grows, and the fixes it suggests when a device is too small. stories260K's config.json alone (no weights)
on the 2,000-record sample; the compiles are cached in one directory that every test here shares."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import jax
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
    assert "a planning estimate" in out.stderr
    assert "TPU v3 core (17.18 GB) yes" in out.stderr  # on CPU, with no --device_memory_gb: common devices


def test_parts_add_up_to_xla_total(setup):
    c, _ = setup
    p = plan(setup)[1]
    _, mc, lc = alpaca.model_config(c, weights=False)
    raw = memory_plan.compiled_memory(c, mc, lc, 8, p["rows"], p["micro_batches"])
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
    assert p["fits"] is False and p["device_memory_gb"] == limit
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
    gb = memory_plan.device_memory_gb
    assert gb(Device(device_kind="TPU v3", platform="tpu"), 0) == 17.18
    assert gb(Device(device_kind="TPU v5 lite", platform="tpu"), 0) == 17.18
    assert gb(Device(device_kind="NVIDIA A100-SXM4-40GB", platform="gpu"), 0) == 30.0
    assert gb(Device(device_kind="NVIDIA A100-SXM4-80GB", platform="gpu"), 0) == 60.0
    assert gb(Device(device_kind="cpu", platform="cpu"), 0) is None
    assert gb(Device(device_kind="cpu", platform="cpu"), 16.0) == 16.0
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    assert math.isclose(gb(Device(device_kind="NVIDIA H200", platform="gpu"), 0), 133.95)


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
