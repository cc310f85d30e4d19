"""LoRA: our adapters against peft's LoRA on transformers' Llama (logits, loss, gradients), and the training
command with --lora_rank end to end: 8 devices against 1, the base weights untouched, the PEFT adapter and
merged exports, kill and resume, another base refused, bad flags."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import alpaca
import llama
from commands import STEPS, STORIES, env_for, run, run_args, write_data

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0  # scale 2: a wrong scale shows
LORA_FLAGS = ["--lora_rank", str(RANK), "--lora_alpha", str(ALPHA), "--lr", "1e-2"]


def nonzero_adapters(c, lc, seed=0):
    """PEFT's initialisation of A, and B non-zero (PEFT starts it at 0, which would hide half of the maths)."""
    ad = llama.init_lora(c, lc, jax.random.key(seed))["layers"]
    keys = jax.random.split(jax.random.key(seed + 1), len(ad))
    return {"layers": {k: {"a": v["a"], "b": 0.2 * jax.random.normal(key, v["b"].shape)}
                       for key, (k, v) in zip(keys, ad.items())}}


def test_adapters_match_peft_logits_loss_and_gradients(tmp_path):
    c, params = llama.load_hf(STORIES)
    lc = llama.LoraConfig(rank=RANK, alpha=ALPHA)
    lora = nonzero_adapters(c, lc)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, c.vocab_size, (2, 24)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
             "loss_mask": (rng.random((2, 24)) < 0.6).astype(np.float32), "segment_ids": np.ones((2, 24), np.int32),
             "positions": np.broadcast_to(np.arange(24, dtype=np.int32), (2, 24))}

    def mean_loss(ad):
        loss_sum, n = llama.loss_fn(params, batch, c, lora=ad, lora_scale=lc.scale)
        return loss_sum / n

    ours_logits = np.asarray(jax.jit(lambda ad: llama.forward(params, tokens, c, lora=ad, lora_scale=lc.scale))(lora))
    ours_loss, ours_grads = jax.jit(jax.value_and_grad(mean_loss))(lora)

    # peft reads the adapters we write (save_peft), then trains them with torch's autograd.
    path = llama.save_peft(str(tmp_path / "adapter"), c, lc, lora, base_model=STORIES)
    base = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, path, is_trainable=True).eval()
    logits = model(torch.tensor(tokens, dtype=torch.long)).logits
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(batch["targets"], dtype=torch.long)[..., None])[..., 0]
    mask = torch.tensor(batch["loss_mask"])
    loss = -(logp * mask).sum() / mask.sum()
    loss.backward()

    assert np.abs(np.asarray(ours_logits) - ours_logits.mean()).max() > 1.0
    np.testing.assert_allclose(ours_logits, logits.detach().numpy(), atol=1e-4, rtol=0)
    assert float(ours_loss) == pytest.approx(loss.item(), rel=1e-5)
    grads = {n.replace(".default", ""): p.grad.numpy() for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * len(lc.targets) * c.num_hidden_layers
    for ours, g in ours_grads["layers"].items():
        for i in range(c.num_hidden_layers):
            module = f"{llama.PEFT_PREFIX}.{i}.{llama.LAYER_NAMES[ours][0].rsplit('.', 1)[0]}"
            for key, torch_name in (("a", "lora_A"), ("b", "lora_B")):
                theirs = grads[f"{module}.{torch_name}.weight"].T
                scale = np.abs(theirs).max()
                assert scale > 0
                np.testing.assert_allclose(np.asarray(g[key][i]), theirs, atol=1e-4 * scale, rtol=0,
                                           err_msg=f"{module}.{torch_name}")


# ---------------------------------------------------------------------------------------------------------
# The training command with LoRA


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    write_data(d)
    shutil.copytree(STORIES, d / "base")  # a base model whose weights a test may change
    return d


@pytest.fixture(scope="module")
def lora8(workdir):
    out = workdir / "lora8"
    rc, log = run(run_args(workdir, out, *LORA_FLAGS, "--hf_save_steps", "3"), env_for(8, workdir))
    assert rc == 0, log
    return out, log


@pytest.fixture(scope="module")
def lora1(workdir):
    out = workdir / "lora1"
    rc, log = run(run_args(workdir, out, *LORA_FLAGS), env_for(1, workdir))
    assert rc == 0, log
    return out


@pytest.fixture(scope="module")
def resumed(workdir):
    """The run of lora8 (on a copy of the base), SIGKILLed on 8 devices while writing checkpoint 4, then
    restarted, on 8 devices again."""
    out = workdir / "crash"
    args = run_args(workdir, out, *LORA_FLAGS, "--model", str(workdir / "base"))
    rc, log = run(args, env_for(8, workdir, CRASH_AT="os.rename:step_00000004/process_00000.safetensors:1:SIGKILL"))
    assert rc == -signal.SIGKILL, log
    rc, log = run(args, env_for(8, workdir))
    assert rc == 0, log
    assert "resuming from" in log and "step_00000002" in log and "written by 1 process(es) x 8 devices" in log
    return out, args


def read_adapter(path, c):
    """A PEFT adapter directory (what peft reads) as our adapter tree and LoraConfig: A [in, r], B [r, out]."""
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    lc = llama.LoraConfig(rank=cfg["r"], alpha=cfg["lora_alpha"])
    layers = {}
    for short, ours in llama.LORA_TARGETS.items():
        module = llama.LAYER_NAMES[ours][0].rsplit(".", 1)[0]  # "self_attn.q_proj"
        if module.split(".")[-1] in cfg["target_modules"]:
            layers[ours] = {key: jnp.asarray(np.stack([
                tensors[f"{llama.PEFT_PREFIX}.{i}.{module}.lora_{name}.weight"].T for i in range(c.num_hidden_layers)]))
                for key, name in (("a", "A"), ("b", "B"))}
    return {"layers": layers}, lc


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def test_eight_devices_equal_one_and_the_loss_goes_down(lora8, lora1):
    out, log = lora8
    got = losses(out)
    assert len(got) == STEPS and f"LoRA: rank {RANK}" in log and "frozen in bfloat16" in log
    np.testing.assert_allclose(got, losses(lora1), rtol=2e-5)
    assert np.mean(got[-2:]) < np.mean(got[:2]) - 0.2
    a8 = load_file(os.path.join(out, "hf", "final-adapter", "adapter_model.safetensors"))
    a1 = load_file(os.path.join(lora1, "hf", "final-adapter", "adapter_model.safetensors"))
    for name in a8:  # 0.5% of an lr step: Adam's update of a near-zero gradient carries its rounding noise
        np.testing.assert_allclose(a8[name], a1[name], rtol=1e-4, atol=5e-5, err_msg=name)
    # A checkpoint holds the adapters and their AdamW state, nothing of the base.
    meta = json.load(open(os.path.join(out, "checkpoints", "step_00000006", "meta.json")))
    assert meta["base_fingerprint"] and meta["config"]["lora_rank"] == RANK
    names = load_file(os.path.join(out, "checkpoints", "step_00000006", "process_00000.safetensors")).keys()
    assert names and all(n.startswith(("trained/layers/", "opt_state/")) for n in names), names


def test_exports_load_in_peft_and_transformers_with_our_logits(lora8):
    out = lora8[0]
    hf = os.path.join(out, "hf")
    assert sorted(os.listdir(hf)) == ["final", "final-adapter", "step_00000003", "step_00000003-adapter"]
    adapter, merged = os.path.join(hf, "final-adapter"), os.path.join(hf, "final")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert (cfg["base_model_name_or_path"], cfg["r"], cfg["lora_alpha"]) == (STORIES, RANK, ALPHA)
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
    c, base = llama.load_hf(STORIES)
    lora, lc = read_adapter(adapter, c)
    base_name = STORIES
    tokens = np.array([[1] + list(range(40, 70))], np.int32)

    # The adapter in peft, on the float32 base as stored: our forward with the same base and adapters.
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        base_name, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(llama.forward(base, jnp.asarray(tokens), c, lora=lora, lora_scale=lc.scale))
    assert np.abs(ours - llama.forward(base, jnp.asarray(tokens), c)).max() > 1e-2  # the adapters trained
    np.testing.assert_allclose(ours, theirs, atol=1e-4)

    # The merged export is W + s A B on the base that trained: --param_dtype bfloat16, untouched. In
    # transformers, as a plain Llama: our forward on that base with the adapters.
    trained_base = jax.tree.map(lambda w: w.astype(jnp.bfloat16).astype(jnp.float32), base)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(llama.forward(trained_base, jnp.asarray(tokens), c, lora=lora, lora_scale=lc.scale))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    exported = load_file(os.path.join(merged, "model.safetensors"))
    for name, w in load_file(os.path.join(STORIES, "model.safetensors")).items():
        if "norm" in name or "embed" in name:  # not adapted: the base's bits (bfloat16), unchanged by training
            np.testing.assert_array_equal(exported[name], w.astype(jnp.bfloat16).astype(np.float32), err_msg=name)


def test_kill_and_resume_is_bitwise_exact(lora8, resumed):
    assert losses(resumed[0]) == losses(lora8[0])
    for name in ("final-adapter/adapter_model.safetensors", "final/model.safetensors"):
        expected = load_file(os.path.join(lora8[0], "hf", name))
        got = load_file(os.path.join(resumed[0], "hf", name))
        assert got.keys() == expected.keys()
        for k, v in got.items():
            np.testing.assert_array_equal(v, expected[k], err_msg=f"{name}: {k}")


def test_resume_on_other_base_weights_is_refused(workdir, resumed, capsys):
    out, args = resumed
    before = sorted(os.listdir(out / "checkpoints"))
    file = workdir / "base" / "model.safetensors"  # --model's path is checked too: change the weights there
    original = file.read_bytes()
    save_file({k: v * np.float32(1.01) for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    try:
        assert alpaca.main(args) == 2
    finally:
        file.write_bytes(original)  # the fixture's base, as other tests know it
    assert "the base model's weights" in capsys.readouterr().err
    assert sorted(os.listdir(out / "checkpoints")) == before


def test_lora_and_full_fine_tune_checkpoints_do_not_resume_each_other(workdir, lora8, tmp_path, capsys):
    out = lora8[0]
    before = sorted(os.listdir(out / "checkpoints"))
    assert alpaca.main(run_args(workdir, out)) == 2  # no --lora_rank: a full fine-tune
    assert f"--lora_rank {RANK} (this run: 0)" in capsys.readouterr().err
    assert sorted(os.listdir(out / "checkpoints")) == before
    # A full fine-tune's checkpoint (its meta.json is what decides) resumed with LoRA flags.
    full = tmp_path / "full"
    meta = json.load(open(out / "checkpoints" / "step_00000006" / "meta.json"))
    meta["config"].update(lora_rank=0, param_dtype="float32")
    del meta["base_fingerprint"]
    shutil.copytree(out / "checkpoints" / "step_00000006", full / "checkpoints" / "step_00000006")
    json.dump(meta, open(full / "checkpoints" / "step_00000006" / "meta.json", "w"))
    assert alpaca.main(run_args(workdir, full, *LORA_FLAGS)) == 2
    assert f"--lora_rank 0 (this run: {RANK})" in capsys.readouterr().err
    assert sorted(os.listdir(full / "checkpoints" / "step_00000006")) == ["meta.json", "process_00000.safetensors"]


@pytest.mark.parametrize("flags,message", [
    (["--lora_rank", "-1"], "--lora_rank must be >= 0, got -1"),
    (["--lora_rank", "4", "--lora_alpha", "-8"], "--lora_alpha must be positive, got -8.0"),
    (["--lora_rank", "4", "--lora_targets", "q,query"], "--lora_targets 'q,query': unknown ['query']"),
    # stories260K: k and v are [64, 32] (4 kv heads of 8)
    (["--lora_rank", "33"], "--lora_rank 33 is larger than the smallest dimension of a matrix it adapts: k is [64, 32]"),
])
def test_bad_lora_flags_fail_clearly_and_write_nothing(workdir, tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    assert alpaca.main(run_args(workdir, out) + flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
