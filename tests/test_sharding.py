"""sharding.py on 8 virtual CPU devices: the FSDP train step against 1 device, against plain jax.grad + optax,
gradient accumulation, memory per device, the collectives in the compiled HLO, and the error messages."""

import dataclasses
import importlib.metadata
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llama
import sharding

# Tiny, but every sharded dimension (hidden_size) divides by 8, and K < H exercises grouped-query attention.
CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
# Optimizer settings that make every part of AdamW matter within 3 steps: warmup (step 0 has lr 0, as in HF),
# cosine decay, weight decay, and a clip threshold below the gradient norm (~1.1), so clipping is active.
# eps=1e-6 rather than 1e-8: with a tiny eps, Adam's first update is lr * sign(g), and gradients that are
# zero up to float noise (sums in another order on 8 devices) would flip sign and move a weight by 2 lr.
OPT = sharding.AdamWConfig(lr=1e-2, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.1, grad_clip=0.5,
                           warmup_steps=1, total_steps=5)
STEPS = 3
# Float32 compute. Sharded and unsharded programs sum the same numbers in different orders (over devices,
# over micro-batches): losses and gradient norms agree to ~1e-7 relative. Weights agree to ~1e-6, except where
# Adam divides a near-zero gradient by its own root mean square: the smallest gradient element here (2e-7,
# against a mean of 4e-3) carries rounding noise of a few percent into its update, observed 1.1e-5 against
# the reference after 3 steps. PARAM_ATOL = 5e-5 is 0.5% of one lr-sized step.
RTOL, PARAM_ATOL = 1e-5, 5e-5


def make_batch(rows, T=16, seed=0):
    """Packed rows like the data pipeline's: 2 examples per row then padding (segment 0), positions restarting
    per example, loss on part of each example."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (rows, T)).astype(np.int32)
    segment_ids = np.zeros((rows, T), np.int32)
    positions = np.zeros((rows, T), np.int32)
    for r in range(rows):
        a, b = rng.integers(3, T // 2), rng.integers(3, T // 2)
        segment_ids[r, :a], segment_ids[r, a:a + b] = 1, 2
        positions[r, :a], positions[r, a:a + b] = np.arange(a), np.arange(b)
    loss_mask = ((segment_ids > 0) & (rng.random((rows, T)) < 0.7)).astype(np.float32)
    targets = np.roll(tokens, -1, axis=1)
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions)


def host_params(config=CONFIG, seed=0):
    # numpy on the host, so that donating the sharded copies never deletes the reference
    return jax.tree.map(np.asarray, llama.init_params(config, jax.random.key(seed), std=0.1))


def run_sharded(n_devices, batch, *, config=CONFIG, num_micro_batches=1, steps=STEPS):
    mesh = sharding.make_mesh(devices=jax.devices()[:n_devices])
    state = sharding.init_state(config, sharding.shard_params(host_params(config), mesh))
    step = sharding.make_train_step(config, mesh, OPT, compute_dtype=jnp.float32,
                                    num_micro_batches=num_micro_batches)
    sharded_batch = sharding.shard_batch(batch, mesh)
    metrics = []
    for _ in range(steps):
        state, m = step(state, sharded_batch)
        metrics.append({k: float(v) for k, v in m.items()})
    assert state["frozen"] == {}  # a full fine-tune trains every weight
    return dict(mesh=mesh, params=state["trained"], opt_state=state["opt_state"], metrics=metrics, step=step,
                batch=sharded_batch)


def optax_steps(start, mean_loss, steps=STEPS, decay_mask=None):
    """Independent: jax.grad of mean_loss from `start`, optax's clipping, AdamW and warmup-cosine schedule.
    Returns (what was trained, losses, gradient norms)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, OPT.lr, OPT.warmup_steps, OPT.total_steps, 0.0)
    tx = optax.chain(optax.clip_by_global_norm(OPT.grad_clip),
                     optax.adamw(schedule, b1=OPT.b1, b2=OPT.b2, eps=OPT.eps, weight_decay=OPT.weight_decay,
                                 mask=decay_mask))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(mean_loss)(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss, optax.tree.norm(g)

    params, state = start, tx.init(start)
    losses, norms = [], []
    for _ in range(steps):
        params, state, loss, norm = step(params, state)
        losses.append(float(loss))
        norms.append(float(norm))
    return params, losses, norms


def run_reference(batch, *, config=CONFIG, steps=STEPS):
    """The full fine-tune's reference: every weight trained, the norms' weights not decayed."""
    def mean_loss(p):
        loss_sum, n = llama.loss_fn(p, batch, config, compute_dtype=jnp.float32)
        return loss_sum / n

    decay_mask = jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path),
                                                  host_params(config))
    return optax_steps(jax.tree.map(jnp.asarray, host_params(config)), mean_loss, steps, decay_mask)


@pytest.fixture(scope="module")
def eight():
    return run_sharded(8, make_batch(16))


@pytest.fixture(scope="module")
def one():
    return run_sharded(1, make_batch(16))


def assert_trees_close(a, b, rtol=RTOL, atol=PARAM_ATOL):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def test_eight_devices_match_one_device(eight, one):
    for m8, m1 in zip(eight["metrics"], one["metrics"]):
        for k in m8:
            np.testing.assert_allclose(m8[k], m1[k], rtol=RTOL, err_msg=k)
    assert_trees_close(eight["params"], one["params"])
    assert_trees_close(eight["opt_state"]["mu"], one["opt_state"]["mu"])
    # and the weights really moved: the comparison is not between two copies of the initial weights
    moved = np.abs(np.asarray(eight["params"]["layers"]["wq"]) - host_params()["layers"]["wq"]).max()
    assert moved > OPT.lr


def test_train_step_matches_plain_grad_and_optax(eight):
    params, losses, norms = run_reference(make_batch(16))
    np.testing.assert_allclose([m["loss"] for m in eight["metrics"]], losses, rtol=RTOL)
    np.testing.assert_allclose([m["grad_norm"] for m in eight["metrics"]], norms, rtol=RTOL)
    assert norms[0] > OPT.grad_clip  # clipping was active
    assert eight["metrics"][0]["lr"] == 0.0 and eight["metrics"][1]["lr"] == pytest.approx(OPT.lr)
    assert_trees_close(eight["params"], params)
    assert int(eight["opt_state"]["step"]) == STEPS


def test_loss_is_mean_over_all_tokens_of_global_batch(eight):
    batch = make_batch(16)
    assert eight["metrics"][0]["n_tokens"] == batch["loss_mask"].sum()
    loss_sum, n = llama.loss_fn(jax.tree.map(jnp.asarray, host_params()), batch, CONFIG)
    assert eight["metrics"][0]["loss"] == pytest.approx(float(loss_sum / n), rel=RTOL)


def test_gradient_accumulation_equals_one_batch():
    # Tied embeddings here, so that path (embed used twice, gathered once) is covered too.
    config = dataclasses.replace(CONFIG, tie_word_embeddings=True)
    batch = make_batch(32, seed=1)  # 8 devices x 4 micro-batches x 1 row
    whole = run_sharded(8, batch, config=config, num_micro_batches=1, steps=2)
    accumulated = run_sharded(8, batch, config=config, num_micro_batches=4, steps=2)
    assert "lm_head" not in whole["params"]
    for a, b in zip(whole["metrics"], accumulated["metrics"]):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=RTOL, err_msg=k)
    assert_trees_close(whole["params"], accumulated["params"])


def test_lr_schedule_matches_hugging_face():
    torch = pytest.importorskip("torch")
    from transformers.optimization import get_cosine_schedule_with_warmup

    cfg = dataclasses.replace(OPT, lr=2e-5, warmup_steps=3, total_steps=10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.total_steps)
    for step in range(cfg.total_steps + 1):
        assert float(sharding.lr_at(cfg, step)) == pytest.approx(schedule.get_last_lr()[0], rel=1e-5, abs=1e-12)
        opt.step()
        schedule.step()


def test_memory_per_device_is_one_nth(eight):
    """Read from the arrays' shardings: what device d really holds, for params and AdamW state after 3 steps."""
    n = 8
    for name, tree in [("params", eight["params"]), ("mu", eight["opt_state"]["mu"]),
                       ("nu", eight["opt_state"]["nu"])]:
        total = sum(x.nbytes for x in jax.tree.leaves(tree))
        for device in jax.devices():
            held = sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
                       if s.device == device)
            assert held * n == total, (name, device, held, total)
    for x in jax.tree.leaves(eight["opt_state"]["mu"]):
        assert x.dtype == jnp.float32
    for x in jax.tree.leaves(eight["params"]):
        assert x.dtype == jnp.float32  # master weights stay float32
    # the sharded dimension is hidden_size, as the partition table says
    wo = eight["params"]["layers"]["wo"]
    assert wo.addressable_shards[0].data.shape == (2, 32, 32 // n)


def test_compiled_step_has_fsdp_collectives(eight):
    """bf16 compute. Our program (lowered StableHLO) gathers matrices in bf16 and norms in float32, and
    reduce-scatters gradients in float32. The compiled HLO has all-gathers and reduce-scatters, and its only
    all-reduces are of scalars: no gradient is all-reduced (that would be plain data parallelism).
    (XLA:CPU rewrites bf16 collectives into f32 ones when it compiles, so dtypes are read before that.)"""
    mesh = eight["mesh"]
    step = sharding.make_train_step(CONFIG, mesh, OPT, compute_dtype=jnp.bfloat16)
    state = sharding.init_state(CONFIG, sharding.shard_params(host_params(), mesh))
    lowered = step.lower(state, eight["batch"])

    text = lowered.as_text()
    gathered = re.findall(r'stablehlo\.all_gather"[^\n]*-> tensor<([0-9x]+)x(\w+)>', text)
    scattered = re.findall(r'stablehlo\.reduce_scatter".*?\}\) : \(tensor<[^>]*>\) -> tensor<[0-9x]+x(\w+)>',
                           text, flags=re.S)
    assert {dtype for shape, dtype in gathered if "x" in shape} == {"bf16"}, gathered  # matrices
    assert {dtype for shape, dtype in gathered if "x" not in shape} == {"f32"}, gathered  # norms
    assert scattered and set(scattered) == {"f32"}, scattered
    # One reduce-scatter per tensor (9 per layer inside the scan, 3 top-level); one all-gather per tensor in
    # the forward pass, and the 9 layer gathers once more in the backward pass, because of remat. Without
    # remat the backward would reuse the gathered weights: every layer whole on every device at once.
    assert len(scattered) == 12 and len(gathered) == 12 + 9
    no_remat = sharding.make_train_step(CONFIG, mesh, OPT, compute_dtype=jnp.bfloat16, remat=False)
    assert no_remat.lower(state, eight["batch"]).as_text().count(
        'stablehlo.all_gather"') == 12

    compiled = lowered.compile().as_text()
    ops = [line.split(" = ", 1)[1] for line in compiled.splitlines() if " = " in line]
    collective = lambda name: [op for op in ops if re.search(rf"\s{name}(-start)?\(", op)]  # noqa: E731
    assert collective("all-gather") and collective("reduce-scatter"), "no FSDP collectives in the compiled step"
    reduces = collective("all-reduce")
    assert reduces and all(re.match(r"\(?f32\[\](, f32\[\])*\)? ", op) for op in reduces), reduces


def test_clear_errors_for_shapes_that_do_not_divide(eight):
    mesh = eight["mesh"]
    odd = dataclasses.replace(CONFIG, hidden_size=36)  # 36 is not a multiple of 8
    shapes = jax.eval_shape(lambda: llama.init_params(odd, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"parameter 'embed' of shape \(64, 36\) over 8 'fsdp' devices.*36"):
        sharding.param_specs(shapes, mesh)
    with pytest.raises(ValueError, match="hidden_size"):
        sharding.make_train_step(odd, mesh, OPT)
    with pytest.raises(KeyError, match="'layers/w_extra'"):
        sharding.param_specs({"layers": {"w_extra": jax.ShapeDtypeStruct((2, 8), jnp.float32)}}, mesh)


# LoRA on the same step: the base frozen (bf16 here, as alpaca.py keeps it), only the adapters trained.
LORA = llama.LoraConfig(rank=4, alpha=8.0)


def host_adapters(seed=1):
    """Adapters as PEFT initialises A, with B non-zero: B = 0 would leave A without gradient at the first step."""
    ad = llama.init_lora(CONFIG, LORA, jax.random.key(seed))["layers"]
    keys = jax.random.split(jax.random.key(seed + 1), len(ad))
    return {"layers": {name: {"a": np.asarray(v["a"]), "b": np.asarray(0.1 * jax.random.normal(k, v["b"].shape))}
                       for k, (name, v) in zip(keys, ad.items())}}


def bf16_base():
    return jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16)), host_params())


@pytest.fixture(scope="module")
def lora_eight():
    """3 LoRA steps on 8 devices, float32 compute, and the program they ran (lowered and compiled)."""
    mesh = sharding.make_mesh()
    base = sharding.shard_params(bf16_base(), mesh)
    state = sharding.init_state(CONFIG, base, LORA, jax.random.key(0))
    like = sharding.abstract_state(CONFIG, mesh, jnp.bfloat16, LORA)
    assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), state) == \
        jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), like)  # what checkpoints are read into
    state["trained"] = jax.device_put(host_adapters(), state["trained"]["layers"]["wq"]["a"].sharding)
    batch = sharding.shard_batch(make_batch(16), mesh)
    lowered = sharding.make_train_step(CONFIG, mesh, OPT, compute_dtype=jnp.float32, lora=LORA).lower(state, batch)
    step = lowered.compile()
    metrics = []
    for _ in range(STEPS):
        state, m = step(state, batch)
        metrics.append({k: float(v) for k, v in m.items()})
    return dict(base=state["frozen"], adapters=state["trained"], opt_state=state["opt_state"], metrics=metrics,
                lowered=lowered.as_text(), compiled=step.as_text())


def test_lora_step_trains_only_the_adapters_and_matches_plain_grad_and_optax(lora_eight):
    # Reference: jax.grad of the unsharded mean loss w.r.t. the adapters alone, optax's AdamW and clipping.
    batch = make_batch(16)
    base = jax.tree.map(jnp.asarray, bf16_base())

    def mean_loss(ad):
        loss_sum, n = llama.loss_fn(base, batch, CONFIG, compute_dtype=jnp.float32, lora=ad, lora_scale=LORA.scale)
        return loss_sum / n

    ad, losses, norms = optax_steps(jax.tree.map(jnp.asarray, host_adapters()), mean_loss)
    np.testing.assert_allclose([m["loss"] for m in lora_eight["metrics"]], losses, rtol=RTOL)
    np.testing.assert_allclose([m["grad_norm"] for m in lora_eight["metrics"]], norms, rtol=RTOL)
    assert_trees_close(lora_eight["adapters"], ad)
    assert norms[0] > OPT.grad_clip and losses[-1] < losses[0]
    # The frozen base comes back from every step bitwise as it went in.
    for x, y in zip(jax.tree.leaves(lora_eight["base"]), jax.tree.leaves(bf16_base())):
        np.testing.assert_array_equal(np.asarray(x), y)
    # Replicated adapters: every device ends with the same bits (the same update from the same all-reduced gradient).
    for x in jax.tree.leaves((lora_eight["adapters"], lora_eight["opt_state"])):
        for s in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), np.asarray(x.addressable_shards[0].data))


def test_lora_step_gathers_the_frozen_base_and_reduces_only_adapter_gradients(lora_eight):
    """The base is all-gathered as in full FSDP (12 tensors, and the 9 of a layer again in the backward pass),
    but nothing is reduce-scattered: the frozen matrices have no gradient. The only all-reduces move the
    adapters' gradients and scalars: their element count is the adapters' plus a few scalars."""
    text = lora_eight["lowered"]
    assert text.count('stablehlo.all_gather"') == 12 + 9 and "reduce_scatter" not in text
    ops = [line.split(" = ", 1)[1] for line in lora_eight["compiled"].splitlines() if " = " in line]
    assert [op for op in ops if re.search(r"\sall-gather(-start)?\(", op)]
    assert not [op for op in ops if re.search(r"\sreduce-scatter(-start)?\(", op)]
    reduces = [op for op in ops if re.search(r"\sall-reduce(-start)?\(", op)]
    reduced = sum(math.prod(int(d) for d in dims.split(",") if d) for op in reduces
                  for dims in re.findall(r"f32\[([0-9,]*)\]", op.split(" all-reduce")[0]))
    n_adapters = sum(x.size for x in jax.tree.leaves(lora_eight["adapters"]))
    assert n_adapters <= reduced <= n_adapters + 8, (reduced, n_adapters, reduces)


# The same claims in the program a TPU runs: compiled by libtpu for compile-only devices of a TPU slice (no TPU
# needed). Wide enough that a device's slice of D is a whole TPU tile (1024 / 8 = 128 lanes): the TPU compiler
# treats tensors narrower than a tile differently, and the claims are about real widths.
WIDE = llama.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64)


def tpu_program(topology, lora=None):
    """(compiled TPU program, abstract state, abstract batch) of WIDE's bf16 step on a TPU slice."""
    try:
        importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip('needs libtpu, the TPU compiler (pip install "jax[tpu]==0.10.2"; tests/requirements.txt)')
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to lock
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    mesh = sharding.make_mesh(devices=devices)
    state = sharding.abstract_state(WIDE, mesh, jnp.bfloat16 if lora else jnp.float32, lora)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
             for k, v in make_batch(8).items()}
    step = sharding.make_train_step(WIDE, mesh, OPT, compute_dtype=jnp.bfloat16, lora=lora)
    return step.lower(state, batch).compile(), state, batch


def hlo_loops(text):
    """{while loop body: the collectives (op, [(dtype, shape), ...]) in it and in what it calls} of compiled
    HLO text, and the same for the whole program under None."""
    computations, name = {}, None
    for line in text.splitlines():
        if re.match(r"(ENTRY )?%\S+ .*\{$", line):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            computations[name] = []
        elif name and line.startswith("  "):
            computations[name].append(line)

    def collectives(roots):
        seen, todo = set(), list(roots)
        while todo:  # every computation the roots call, transitively
            c = todo.pop()
            if c not in seen:
                seen.add(c)
                todo += [n for n in re.findall(r"%([\w.-]+)", "\n".join(computations[c])) if n in computations]
        return [(op, [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in
                      re.findall(r"(\w+)\[([\d,]*)\]", result)])
                for c in seen for line in computations[c]
                for result, op in re.findall(r"= (.*?) (all-gather|reduce-scatter|all-reduce)(?:-start)?\(", line)]
    loops = re.findall(r"while\(.*?body=%([\w.-]+)", text)
    return {None: collectives(computations), **{body: collectives([body]) for body in loops}}


def test_the_tpu_program_is_fsdp_as_the_walkthrough_says():
    """WIDE on a TPU v5e-8 (8 devices), compiled by libtpu: the layer loop gathers each layer's matrices whole
    (bf16) in the forward pass and again in the backward pass (remat); the backward loop reduce-scatters
    their float32 gradients to D/N slices; nothing gathers a whole stacked [L, ...] tensor; a device's
    arguments are 1/N of the state (and of the batch). With LoRA: no reduce-scatter at all. On a v3-8 the
    same libtpu all-reduces each layer's whole float32 gradient instead, then keeps its slice."""
    n, D = 8, WIDE.hidden_size
    matrices = {k: s[1:] for k, s in llama.param_shapes(WIDE)["layers"].items() if len(s) == 3}  # [L, in, out]
    whole = set(matrices.values())
    sliced = {tuple(d // n if d == D else d for d in s) for s in whole}  # D split: every matrix has one
    stacked = set(llama.param_shapes(WIDE)["layers"].values())

    def squeezed(shapes):
        return {s[1:] if s[:1] == (1,) else s for _, s in shapes}

    compiled, state, batch = tpu_program("v5e:2x4")
    loops = hlo_loops(compiled.as_text())
    # Two layer loops: the forward scan, and the backward one, which reduce-scatters.
    forward, backward = sorted((k for k in loops if k), key=lambda k: "reduce-scatter" in dict(loops[k]))
    for body in (forward, backward):
        gathered = set().union(*(squeezed(r) for op, r in loops[body] if op == "all-gather"))
        assert whole <= gathered, (body, whole - gathered)
    scattered = [r for op, r in loops[backward] if op == "reduce-scatter"]
    assert {d for r in scattered for d, _ in r} == {"f32"} and squeezed(sum(scattered, [])) == sliced
    assert not [r for op, r in loops[forward] if op == "reduce-scatter"]
    assert not [r for op, r in loops[None] if op == "all-gather" and squeezed(r) & stacked]
    leaves = jax.tree.leaves((state, batch))
    held = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
    everything = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    args = compiled.memory_analysis().argument_size_in_bytes
    assert held <= args <= held * 1.001  # this device's shards, + the TPU's padding of a few small tensors
    assert math.isclose(args * n, everything, rel_tol=2e-3)

    lora = hlo_loops(tpu_program("v5e:2x4", LORA)[0].as_text())
    assert not [r for op, r in lora[None] if op == "reduce-scatter"]
    assert whole <= set().union(*(squeezed(r) for op, r in lora[None] if op == "all-gather"))

    v3 = hlo_loops(tpu_program("v3:2x2")[0].as_text())
    assert not [r for op, r in v3[None] if op == "reduce-scatter"]
    reduced = set().union(*(squeezed(r) for body in v3 if body for op, r in v3[body] if op == "all-reduce"))
    assert whole <= reduced  # every layer matrix's float32 gradient, whole, on every device


def test_a_training_step_matches_transformers_and_torch_adamw():
    """The whole step against Hugging Face's: transformers' LlamaForCausalLM on the real stories260K weights,
    torch.optim.AdamW (norms not decayed, as the HF Trainer), torch's gradient clipping and transformers'
    warmup-cosine schedule; ours on 8 devices, float32. Three steps: losses, gradient norms and weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.optimization import get_cosine_schedule_with_warmup
    stories = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "stories260K")
    mc, params = llama.load_hf(stories)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, mc.vocab_size, (8, 33)).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((8, 32), np.int32),
             "loss_mask": (rng.random((8, 32)) < 0.6).astype(np.float32),
             "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)).copy()}
    batch["loss_mask"][:, -1] = 0  # HF's model sees 32 tokens: its last logit predicts nothing
    mesh = sharding.make_mesh()
    state = sharding.init_state(mc, sharding.shard_params(jax.tree.map(np.asarray, params), mesh))
    step = sharding.make_train_step(mc, mesh, OPT, compute_dtype=jnp.float32)
    ours = []
    for _ in range(STEPS):
        state, m = step(state, sharding.shard_batch(batch, mesh))
        ours.append((float(m["loss"]), float(m["grad_norm"])))

    model = transformers.AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32)
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if "norm" not in n], "weight_decay": OPT.weight_decay},
              {"params": [p for n, p in named.items() if "norm" in n], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=OPT.lr, betas=(OPT.b1, OPT.b2), eps=OPT.eps)
    schedule = get_cosine_schedule_with_warmup(opt, OPT.warmup_steps, OPT.total_steps)
    labels = np.where(np.concatenate([np.zeros((8, 1)), batch["loss_mask"]], 1) > 0, tokens, -100)
    theirs = []
    for _ in range(STEPS):
        loss = model(torch.tensor(tokens[:, :-1], dtype=torch.long),
                     labels=torch.tensor(labels[:, :-1], dtype=torch.long)).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad()
        theirs.append((loss.item(), norm.item()))
    np.testing.assert_allclose(ours, theirs, rtol=RTOL)
    assert theirs[0][1] > OPT.grad_clip  # clipping was active
    wq = np.asarray(state["trained"]["layers"]["wq"])
    for i in range(mc.num_hidden_layers):
        np.testing.assert_allclose(wq[i], named[f"model.layers.{i}.self_attn.q_proj.weight"].detach().numpy().T,
                                   rtol=RTOL, atol=PARAM_ATOL)
    np.testing.assert_allclose(np.asarray(state["trained"]["embed"]), named["model.embed_tokens.weight"].detach(),
                               rtol=RTOL, atol=PARAM_ATOL)
