"""llama.py against transformers (float32, CPU) and against llama2.c's reference outputs for stories260K."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES = os.path.join(ROOT, "tests", "assets", "stories260K")

# Tiny configs covering each feature. Weights are drawn with a large std (0.3) so that a wrong eps, theta or
# head order moves the logits visibly (transformers' default init gives near-uniform logits).
CASES = {
    "mha": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4),
    "gqa": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2),
    "tied": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, tie_word_embeddings=True),
    "theta_eps": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-2),
    "odd_vocab": dict(vocab_size=101, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1),
    "sharded": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16),
}


def make_hf_model(kwargs, seed=0, std=0.3):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(max_position_embeddings=128, **kwargs)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module", params=list(CASES))
def hf_checkpoint(request, tmp_path_factory):
    name = request.param
    model = make_hf_model(CASES[name])
    path = str(tmp_path_factory.mktemp(name))
    shard = "20KB" if name == "sharded" else None
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    if name == "sharded":
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    return name, model, path


def test_logits_and_loss_match_transformers(hf_checkpoint):
    name, model, path = hf_checkpoint
    c, params = llama.load_hf(path)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, c.vocab_size, (2, 17)).astype(np.int32)
    ours = np.asarray(llama.forward(params, jnp.asarray(tokens), c))
    theirs = hf_logits(model, tokens)
    assert ours.shape == theirs.shape == (2, 17, c.vocab_size)
    assert np.abs(theirs).max() > 1.0  # the test weights must give non-trivial logits
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    # The masked loss: HF's mean over the same (shifted) tokens.
    mask = (rng.random((2, 16)) < 0.6).astype(np.float32)
    s, n = llama.cross_entropy(jnp.asarray(ours[:, :-1]), jnp.asarray(tokens[:, 1:]), jnp.asarray(mask))
    logp = torch.log_softmax(torch.tensor(theirs[:, :-1]), -1)
    nll = -logp.gather(-1, torch.tensor(tokens[:, 1:], dtype=torch.long)[..., None])[..., 0].numpy()
    assert float(n) == mask.sum()
    np.testing.assert_allclose(float(s) / float(n), (nll * mask).sum() / mask.sum(), rtol=1e-5)


def test_save_hf_round_trip_loads_in_transformers(hf_checkpoint, tmp_path):
    name, model, path = hf_checkpoint
    c, params = llama.load_hf(path)
    out = llama.save_hf(str(tmp_path / "export"), c, params, max_shard_bytes=30_000)
    files = os.listdir(out)
    assert "config.json" in files and not any(f.endswith(".partial") for f in files)
    n_shards = len([f for f in files if f.endswith(".safetensors")])
    assert (n_shards > 1) == ("model.safetensors.index.json" in files)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.arange(12, dtype=np.int32).reshape(1, 12) % c.vocab_size
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(model, tokens), atol=1e-5, rtol=0)
    c2, params2 = llama.load_hf(out)
    assert c2 == c
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_hf_replaces_an_existing_export_without_renaming_directories(tmp_path, monkeypatch):
    from faults.sitecustomize import files_only
    for name in ("rename", "replace"):  # as on a Cloud Storage FUSE mount
        monkeypatch.setattr(os, name, files_only(getattr(os, name)))
    c, params = llama.load_hf(STORIES)
    out = str(tmp_path / "export")
    llama.save_hf(out, c, params, max_shard_bytes=30_000)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    params2 = dict(params, final_norm=params["final_norm"] * 2)
    llama.save_hf(out, c, params2)
    _, back = llama.load_hf(out)
    np.testing.assert_array_equal(np.asarray(back["final_norm"]), np.asarray(params2["final_norm"]))
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]  # the old shards and index are gone

    # An export that fails while writing leaves the previous one complete, and no temporary file.
    with pytest.raises(FileNotFoundError):
        llama.save_hf(out, c, params, tokenizer=str(tmp_path / "missing.model"))
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    _, back = llama.load_hf(out)
    np.testing.assert_array_equal(np.asarray(back["final_norm"]), np.asarray(params2["final_norm"]))


def test_stories260k_matches_llama2c_reference():
    ref = json.load(open(os.path.join(STORIES, "reference_outputs.json")))
    c, params = llama.load_hf(STORIES)
    assert c.num_key_value_heads == 4 and c.tie_word_embeddings
    logits = llama.forward(params, jnp.asarray([ref["prompt_ids_with_bos"]]), c)
    np.testing.assert_allclose(np.asarray(logits[0, -1]), np.array(ref["next_token_logits_float64"]), atol=1e-4)
    ids = jnp.asarray([ref["nll_check"]["ids_with_bos"]])
    s, n = llama.cross_entropy(llama.forward(params, ids[:, :-1], c), ids[:, 1:], jnp.ones(ids[:, 1:].shape))
    np.testing.assert_allclose(float(s / n), ref["nll_check"]["mean_nll_nats"], rtol=1e-5)


def test_packed_row_equals_examples_alone():
    c, params = llama.load_hf(STORIES)
    rng = np.random.default_rng(0)
    a, b = rng.integers(3, c.vocab_size, 7), rng.integers(3, c.vocab_size, 5)
    row = np.concatenate([a, b, [0, 0]])[None].astype(np.int32)
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]], np.int32)
    pos = np.array([list(range(7)) + list(range(5)) + [0, 0]], np.int32)
    packed = np.asarray(llama.forward(params, jnp.asarray(row), c, positions=jnp.asarray(pos),
                                      segment_ids=jnp.asarray(seg)))[0]
    alone_a = np.asarray(llama.forward(params, jnp.asarray(a[None]), c))[0]
    alone_b = np.asarray(llama.forward(params, jnp.asarray(b[None]), c))[0]
    np.testing.assert_allclose(packed[:7], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[7:12], alone_b, atol=1e-5)
    # Without the segment mask the second example would see the first: the check above is not vacuous.
    unmasked = np.asarray(llama.forward(params, jnp.asarray(row), c, positions=jnp.asarray(pos)))[0]
    assert np.abs(unmasked[7:12] - alone_b).max() > 1e-2


def test_bfloat16_compute_close_to_float32():
    c, params = llama.load_hf(STORIES)
    tokens = jnp.asarray([json.load(open(os.path.join(STORIES, "reference_outputs.json")))["greedy_from_bos_ids"][:64]])
    f32 = np.asarray(llama.forward(params, tokens, c))
    bf16 = np.asarray(llama.forward(params, tokens, c, compute_dtype=jnp.bfloat16))
    assert bf16.dtype == np.float32  # logits always come out in float32
    # bf16 has 8 bits of mantissa: logits of magnitude ~20 move by a few tenths at most, top-1 mostly agrees.
    assert np.abs(bf16 - f32).max() < 0.5 * max(1.0, np.abs(f32).max() / 20)
    assert np.mean(bf16.argmax(-1) == f32.argmax(-1)) > 0.9
    assert np.abs(bf16 - f32).max() > 0  # really computed in bf16


def test_load_hf_into_a_sharding_gives_each_device_its_slice():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    c, full = llama.load_hf(STORIES)
    # Shard each parameter's last dim when 8 divides it, else replicate: any pytree of shardings works.
    specs = jax.tree.map(lambda a: NamedSharding(mesh, P(*([None] * (a.ndim - 1) + ["fsdp"])) if a.shape[-1] % 8 == 0
                                                  else P()), full)
    _, sharded = llama.load_hf(STORIES, shardings=specs)
    wq = sharded["layers"]["wq"]
    assert wq.sharding == specs["layers"]["wq"]
    assert wq.addressable_shards[0].data.shape == (c.num_hidden_layers, c.hidden_size, c.hidden_size // 8)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def greedy_without_cache(params, prompt, c, n):
    """The reference for the KV cache: a full forward pass over the whole sequence for every new token (the
    sequence is padded to its final length, which a causal model never looks at, so it compiles once)."""
    logits = jax.jit(lambda p, s: llama.forward(p, s, c))
    seq = np.zeros(len(prompt) + n, np.int32)
    seq[:len(prompt)] = prompt
    for i in range(len(prompt), len(seq)):
        seq[i] = int(jnp.argmax(logits(params, jnp.asarray(seq[None]))[0, i - 1]))
    return seq[len(prompt):]


def test_generate_kv_cache_equals_no_cache_and_llama2c():
    ref = json.load(open(os.path.join(STORIES, "reference_outputs.json")))
    c, params = llama.load_hf(STORIES)
    g = ref["greedy_from_bos_ids"]
    cached = np.asarray(llama.generate(params, jnp.asarray([g[:5]]), c, max_new_tokens=40, eos_token_id=-1))[0]
    uncached = greedy_without_cache(params, g[:5], c, 40)
    np.testing.assert_array_equal(cached, g[5:45])
    np.testing.assert_array_equal(uncached, cached)
    # Sampling: same key, same tokens; top_p tiny is greedy.
    key = jax.random.PRNGKey(3)
    s1 = llama.generate(params, jnp.asarray([g[:5]]), c, max_new_tokens=16, temperature=1.0, top_p=0.9, key=key)
    s2 = llama.generate(params, jnp.asarray([g[:5]]), c, max_new_tokens=16, temperature=1.0, top_p=0.9, key=key)
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    nucleus0 = llama.generate(params, jnp.asarray([g[:5]]), c, max_new_tokens=16, temperature=1.0, top_p=1e-6,
                              key=key, eos_token_id=-1)
    np.testing.assert_array_equal(np.asarray(nucleus0)[0], g[5:21])


def test_generate_stops_at_eos():
    c, params = llama.load_hf(STORIES)
    g = json.load(open(os.path.join(STORIES, "reference_outputs.json")))["greedy_from_bos_ids"]
    eos = g[8]  # pretend the 4th generated token is EOS
    out = np.asarray(llama.generate(params, jnp.asarray([g[:5]]), c, max_new_tokens=10, eos_token_id=eos))[0]
    np.testing.assert_array_equal(out[:4], g[5:9])
    assert (out[3:] == eos).all()


def test_greedy_generation_equals_transformers():
    c, params = llama.load_hf(STORIES)
    hf = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    prompt = [1, 403, 407, 261, 378]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False, min_new_tokens=48)
    ours = llama.generate(params, jnp.asarray([prompt]), c, max_new_tokens=48, eos_token_id=-1)
    np.testing.assert_array_equal(np.asarray(ours)[0], theirs[0, 5:].numpy())


# --- config.json layouts and bad input -------------------------------------------------------------------

BASE = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=4)


def test_config_layouts():
    v4 = llama.LlamaConfig.from_hf(dict(BASE, rope_theta=500000.0, rope_scaling=None))
    v5 = llama.LlamaConfig.from_hf(dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    assert v4 == v5 and v4.rope_theta == 500000.0
    assert v4.num_key_value_heads == 4 and v4.head_dim == 4  # defaults: MHA, D / H
    assert llama.LlamaConfig.from_hf(v4.to_hf()) == v4


@pytest.mark.parametrize("field,value", [
    ("model_type", "gpt2"), ("model_type", "mistral"), ("hidden_act", "gelu"), ("attention_bias", True),
    ("mlp_bias", True),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5}), ("num_key_value_heads", 3),
])
def test_unsupported_config_fields_are_named(field, value):
    with pytest.raises(llama.CheckpointError, match=field.split(".")[0]):
        llama.LlamaConfig.from_hf(dict(BASE, **{field: value}))


@pytest.fixture
def stories_copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(STORIES, dst)
    return dst


def _edit_tensors(path, edit):
    from safetensors.numpy import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_bad_checkpoints_raise_clear_errors(stories_copy, tmp_path):
    with pytest.raises(llama.CheckpointError, match="no such model directory"):
        llama.load_hf(str(tmp_path / "nope"))
    with pytest.raises(llama.CheckpointError, match="no config.json"):
        llama.load_hf(str(tmp_path))

    d = str(stories_copy)
    _edit_tensors(d, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(llama.CheckpointError, match="unexpected tensors.*model.extra.weight"):
        llama.load_hf(d)
    _edit_tensors(d, lambda t: (t.pop("model.extra.weight"), t.pop("model.layers.2.mlp.up_proj.weight")))
    with pytest.raises(llama.CheckpointError, match="missing tensors.*layers.2.mlp.up_proj"):
        llama.load_hf(d)
    _edit_tensors(d, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((171, 64), np.float32)}))
    with pytest.raises(llama.CheckpointError, match=r"up_proj.weight has shape \(171, 64\).*\(172, 64\)"):
        llama.load_hf(d)

    cfg = json.load(open(os.path.join(d, "config.json")))
    json.dump(dict(cfg, model_type="gpt_neox"), open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(llama.CheckpointError, match="config.json: model_type='gpt_neox'"):
        llama.load_hf(d)

    os.remove(os.path.join(d, "model.safetensors"))
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(llama.CheckpointError, match="no model.safetensors"):
        llama.load_hf(d)


def test_damaged_files_are_named_not_tracebacks(stories_copy):
    d = str(stories_copy)
    weights, config = os.path.join(d, "model.safetensors"), os.path.join(d, "config.json")
    # A model.safetensors cut short (a copy or download that stopped): the error names the file.
    os.truncate(weights, os.path.getsize(weights) // 2)
    cut = "^" + re.escape(weights) + r": cannot read this safetensors file \(it is cut or damaged: .+\)$"
    for load in (llama.load_hf, llama.check_checkpoint):
        with pytest.raises(llama.CheckpointError, match=cut):
            load(d)
    # A config.json that is not JSON.
    shutil.copy(os.path.join(STORIES, "model.safetensors"), weights)
    good_config = open(config, "rb").read()
    with open(config, "wb") as f:
        f.write(b"\x00\x9f{garbage")
    for load in (llama.load_hf, llama.check_checkpoint, llama.read_config):
        with pytest.raises(llama.CheckpointError, match="^" + re.escape(config) + ": not valid JSON"):
            load(d)
    # A sharded checkpoint whose index is not JSON.
    with open(config, "wb") as f:
        f.write(good_config)
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index, "w") as f:
        f.write('{"weight_map": {"model.norm.weight": "model.safetensors",')  # cut mid-file
    with pytest.raises(llama.CheckpointError, match="^" + re.escape(index) + ": not valid JSON"):
        llama.load_hf(d)


def test_old_checkpoints_with_rotary_buffers_load(stories_copy):
    d = str(stories_copy)
    _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    c, params = llama.load_hf(d)
    assert params["layers"]["wq"].shape == (5, 64, 64)


def test_compare_command_reports_parity():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare.py"), "--model", STORIES,
                          "--prompt", "Once upon a time"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["max_abs_logit_diff"] < 1e-4 and report["top1_agreement"] == 1.0 and report["tokens"] == 5


def test_generation_arguments_are_checked():
    c, params = llama.load_hf(STORIES)
    prompt = jnp.asarray([[1, 403, 407]])
    # Each message names the argument as the command line does (alpaca.py prefixes "--").
    for bad, message in ((dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
                         (dict(temperature=-1.0), "temperature must be >= 0 (0 = greedy), got -1.0"),
                         (dict(max_new_tokens=0), "max_new_tokens must be at least 1, got 0")):
        with pytest.raises(ValueError) as e:
            llama.generate(params, prompt, c, **{"max_new_tokens": 4, **bad})
        assert str(e.value) == message
    # Generating past the positions the model was trained on is refused, not silently wrong.
    P = c.max_position_embeddings
    with pytest.raises(ValueError) as e:
        llama.generate(params, prompt, c, max_new_tokens=P - 2)
    assert str(e.value) == (f"the prompt (3 tokens) + max_new_tokens ({P - 2}) exceeds the model's "
                            f"max_position_embeddings ({P})")
    # The nucleus always keeps the most likely token, however small top_p is.
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15]]))
    assert int(llama.sample_token(logits, jax.random.PRNGKey(0), 1.0, 1e-12)[0]) == 1


def test_compare_without_tokenizer_is_a_clear_error(stories_copy, capsys):
    os.remove(stories_copy / "tokenizer.model")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import compare
    assert compare.main(["--model", str(stories_copy)]) == 2
    assert "no tokenizer.model" in capsys.readouterr().err
