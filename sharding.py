"""Fully sharded data-parallel (FSDP) fine-tuning of llama.py as one explicit shard_map program.

Read top to bottom: the mesh, the partition table, the two collectives that make FSDP (all-gather a
layer's weights before use; its gradient is a reduce-scatter), AdamW by hand, and the train step that
puts them together, for every weight or (LoRA) for low-rank adapters on frozen weights. Every collective
of a step is written out here; llama.py meets devices only where it reads and writes checkpoints (load_hf
puts each slice on its device, save_hf gathers a layer at a time).

For a PyTorch reader: this is torch FSDP's FULL_SHARD (ZeRO-3) written out. Weights, gradients and AdamW
state are split over the devices; a layer is gathered just before use and dropped after. jax.checkpoint is
torch.utils.checkpoint. The step is one compiled function of the whole state, which it donates: XLA writes
the new state into the old buffers, as an in-place optimizer.step() does.

One step, walked through for Llama-2-7B on a TPU v3-32
-----------------------------------------------------
Llama-2-7B: V=32000, D=4096, L=32 layers, H=K=32 heads of E=128, F=11008; 6.74e9 parameters, of which
202.4e6 per decoder layer. A TPU v3-32 is 16 chips x 2 TensorCores; JAX sees N=32 devices (one per core,
16 GiB HBM each). Mesh: fsdp=32. Global batch: R=32 rows of T=512 tokens (about 128 packed
Alpaca examples), i.e. ONE row [1, 512] per device; num_micro_batches=1.

What each device holds between steps (float32; every weight split along D, so D/N = 128):
    embed [32000, 128] 16.4 MB       lm_head [128, 32000] 16.4 MB       final_norm [128]
    layers/wq, wk, wv [32, 128, 4096] 67.1 MB each      wo [32, 4096, 128] 67.1 MB
    layers/w_gate, w_up [32, 128, 11008] 180 MB each    w_down [32, 11008, 128] 180 MB
    layers/attn_norm, mlp_norm [32, 128]
  = 842 MB of parameters (1/32 of 27 GB) + 1.68 GB of AdamW mu and nu: 2.53 GB, the compiled step's
  arguments as libtpu counts them. Unsharded, the same state would be 108 GB per device (the accumulator of
  micro-batches, if any, adds 842 MB).

Forward, inside the jitted shard_map, on every device at once:
  1. embed and lm_head: cast to bf16, ALL-GATHER -> [32000, 4096] each. Each device receives 31/32 of
     262 MB per tensor, 508 MB for the two. They stay whole for the step (524 MB).
  2. lax.scan over the 32 layers. Per layer: cast the layer's shards to bf16 (12.6 MB), ALL-GATHER them
     to the whole layer (404.8 MB; receives 392 MB), run the layer on x [1, 512, 4096], drop the weights.
     Only one layer (maybe two, if XLA prefetches the next) is ever whole on a device. 32 x 392 MB = 12.5 GB.
     (The norms travel in float32, a few KB: llama.py computes RMSNorm in float32.)
  3. logits [1, 512, 32000] float32 (65.5 MB), summed cross-entropy over this device's loss tokens.
Backward (every layer is under jax.checkpoint, so only the layer inputs [1, 512, 4096] were kept):
  4. per layer, in reverse: ALL-GATHER the layer again (392 MB received), recompute it, differentiate.
     The gradient of the whole layer [.., 4096, ..] is then REDUCE-SCATTERED (the transpose of the
     all-gather): each device sends 31/32 of the layer's float32 gradient (784 MB) and keeps only its own
     D/N slice, already summed over the 32 devices' rows. 32 x (392 + 784) MB = 37.6 GB.
  5. embed and lm_head gradients: REDUCE-SCATTER, 2 x 508 MB = 1.0 GB.
After the backward: ALL-REDUCE (psum) of 3 scalars (loss sum, token count, squared gradient norm): bytes.
Then AdamW on the local shards only: no communication at all, 1/32 of the optimizer work per device.

The TPU compiler's view (libtpu 0.0.42.1; benchmarks/memory_plan.py --target v3-32 --seq_len 512): 2.53 GB of
arguments + 4.26 GB of temporaries (the gradient shards, the whole bf16 embed and lm_head and their float32
gradients, a gathered layer, the float32 layer inputs) = 6.79 GB at the peak, of 15.48 GiB usable. On v3 it
turns each reduce-scatter above into an all-reduce of the whole float32 gradient, every device keeping its
slice: twice the gradient's bytes, ~78 GB a step (a v5e keeps most reduce-scatters).
As written, a device moves ~52 GB a step (~39 with bf16 gradients), against ~8 x 6.74e9 x 512 = 2.8e13
FLOPs (6N per token for forward+backward, +2N for the remat recompute). A v3 core does 61.5 bf16 TFLOP/s
(123 per chip), so 0.45 s if every FLOP ran at peak (0.34 s for the 6N that MFU counts); Google quotes 340
TB/s all-reduce bandwidth for a 1024-chip v3 pod, ~330 GB/s per chip: if these collectives reach it, the
chip's 2 x 52 GB take ~0.3 s. Where XLA overlaps each layer's gather with the previous layer's matmuls (its
latency-hiding scheduler does this on TPU), the step is compute-bound, but not by much: halve the tokens per
device (64 devices, or a smaller batch) and it becomes communication-bound. Gradient accumulation does not
help: FSDP gathers and reduce-scatters the weights again for every micro-batch, so M micro-batches cost M
times the bytes above. On a pod, let the device count make the batch; use micro-batches when memory is
short.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import llama

FSDP = "fsdp"  # the one mesh axis: every device holds a slice of every weight and its own rows of the batch
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")  # each [R, T]

# ---------------------------------------------------------------------------------------------------------
# 1. The mesh
# ---------------------------------------------------------------------------------------------------------


def make_mesh(*, devices=None) -> Mesh:
    """A one-axis ("fsdp") mesh over `devices`, by default every device of every process. With several hosts,
    call jax.distributed.initialize() first (automatic on TPU VMs; alpaca.py does it): jax.devices() then
    lists the devices of all hosts. Tensor parallelism would add a second axis; nothing here needs one."""
    devices = jax.devices() if devices is None else list(devices)
    # jax.make_mesh orders the devices so that mesh neighbours are torus (or NVLink) neighbours. Auto axes:
    # make_mesh's default (Explicit) would make jit type-check shardings, which shard_map code does not want.
    return jax.make_mesh((len(devices),), (FSDP,), axis_types=(AxisType.Auto,), devices=devices)


# ---------------------------------------------------------------------------------------------------------
# 2. Partition rules
# ---------------------------------------------------------------------------------------------------------
# Every parameter is split over "fsdp" along its hidden_size dimension D, and along nothing else:
# - D is the one dimension that all twelve tensors have, so there is one divisibility rule to know:
#   hidden_size % fsdp == 0. Llama widths (4096, 5120, 8192; 288 and 64 for the tiny stories models) are
#   multiples of every common device count, whereas V (32000 = 2^8 x 125) and F (11008 = 2^8 x 43; 172 for
#   stories260K) are not. A non-divisible D is an error naming the parameter (no padding: it would change
#   the norms' means and every reader's mental shape).
# - Never the layer axis L: the scan hands each layer to every device in turn; splitting L would give
#   whole layers to devices, which is pipeline parallelism, not FSDP.
# - The norms are sharded too (not replicated). They are tiny, but then EVERY gradient comes out of a
#   reduce-scatter with nothing left to all-reduce, AdamW is shard-local for every tensor, and the global
#   gradient norm is a plain sum of squared shards (a replicated tensor would be counted N times).
# - Gathered shape: the whole weight, gathered one layer at a time (the scan drops L first). Reduce-scatter
#   layout: where D leads (wq, wk, wv, w_gate, w_up, lm_head) each shard is a contiguous block of rows;
#   where D trails (embed, wo, w_down) a shard is a strided block of columns, which XLA may copy into a
#   contiguous buffer around the collective. The bytes moved are the same.
PARTITION_RULES = {
    #                    spec                     global shape  -> shard on one device
    "embed":             P(None, FSDP),         # [V, D]        -> [V, D/N]
    "layers/attn_norm":  P(None, FSDP),         # [L, D]        -> [L, D/N]
    "layers/wq":         P(None, FSDP, None),   # [L, D, H*E]   -> [L, D/N, H*E]
    "layers/wk":         P(None, FSDP, None),   # [L, D, K*E]   -> [L, D/N, K*E]
    "layers/wv":         P(None, FSDP, None),   # [L, D, K*E]   -> [L, D/N, K*E]
    "layers/wo":         P(None, None, FSDP),   # [L, H*E, D]   -> [L, H*E, D/N]
    "layers/mlp_norm":   P(None, FSDP),         # [L, D]        -> [L, D/N]
    "layers/w_gate":     P(None, FSDP, None),   # [L, D, F]     -> [L, D/N, F]
    "layers/w_up":       P(None, FSDP, None),   # [L, D, F]     -> [L, D/N, F]
    "layers/w_down":     P(None, None, FSDP),   # [L, F, D]     -> [L, F, D/N]
    "final_norm":        P(FSDP),               # [D]           -> [D/N]
    "lm_head":           P(FSDP, None),         # [D, V]        -> [D/N, V]
}


def fsdp_dim(name: str) -> int:
    """The dimension of parameter `name` that is split over "fsdp"."""
    return list(PARTITION_RULES[name]).index(FSDP)


def partition_specs(params_or_shapes, mesh: Mesh):
    """The PartitionSpec of every parameter (arrays, or shape tuples as llama.param_shapes gives them);
    checks names and divisibility."""
    n = mesh.shape[FSDP]

    def spec(path, x):
        name = llama.path_name(path)
        if name not in PARTITION_RULES:
            raise KeyError(f"no partition rule for parameter {name!r}; PARTITION_RULES has "
                           f"{list(PARTITION_RULES)}")
        s, shape, d = PARTITION_RULES[name], tuple(getattr(x, "shape", x)), fsdp_dim(name)
        if shape[d] % n:
            raise ValueError(f"cannot shard parameter {name!r} of shape {shape} over {n} 'fsdp' devices: its "
                             f"dimension {d} (hidden_size) is {shape[d]}, not a multiple of {n}. Use a "
                             f"device count that divides hidden_size={shape[d]}.")
        return s

    return jax.tree_util.tree_map_with_path(spec, params_or_shapes, is_leaf=lambda x: isinstance(x, tuple))


def param_specs(params_or_shapes, mesh: Mesh):
    """The NamedSharding of every parameter (arrays or jax.ShapeDtypeStructs in, same tree out). This is
    what llama.load_hf(shardings=...) and jax.jit(out_shardings=...) take."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(params_or_shapes, mesh))


def shard_params(params, mesh: Mesh):
    """Place a (host or single-device) parameter tree on the mesh, split by PARTITION_RULES. Each process
    builds only the shards of its own devices, so this also works on every host of a pod."""
    def place(x, sharding):
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, params, param_specs(params, mesh))


def init_sharded_params(mc: llama.LlamaConfig, key, mesh: Mesh, **kwargs):
    """llama.init_params compiled straight into the sharding: no device ever holds the whole model."""
    return jax.jit(lambda k: llama.init_params(mc, k, **kwargs),
                   out_shardings=param_specs(llama.param_shapes(mc), mesh))(key)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [R, T] are split by rows over "fsdp": device i gets rows i*R/N .. (i+1)*R/N - 1.
    A multi-host loop builds them with jax.make_array_from_process_local_data(batch_sharding(mesh), rows)."""
    return NamedSharding(mesh, P(FSDP))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """A global batch (the same numpy arrays on every process) placed on the mesh, rows split over fsdp."""
    s = batch_sharding(mesh)
    return {k: jax.make_array_from_callback(v.shape, s, lambda index, v=v: v[index])
            for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------
# 3. The FSDP collectives: gather a weight before use; its gradient is a reduce-scatter
# ---------------------------------------------------------------------------------------------------------
# These run inside shard_map, where arrays are per-device shards and collectives are explicit. Autodiff
# would transpose all_gather into psum_scatter by itself; the rule is written out here so that a reader can
# see it, and so that the two directions can use different dtypes: weights travel in bf16 (half the bytes),
# gradients are summed across devices in float32, so that 32 bf16 partial sums do not lose digits
# (torchtitan's default; bf16 would halve the backward's bytes).


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def gather_weight(shard, axis: int, compute_dtype):
    """[.., D/N, ..] on each device -> the whole [.., D, ..] on every device, in compute_dtype.
    ALL-GATHER over "fsdp": each device sends its shard to the others and receives N-1 shards.
    Cast first, then gather: with bf16 the bytes on the wire are halved."""
    return jax.lax.all_gather(shard.astype(compute_dtype), FSDP, axis=axis, tiled=True)


def _gather_weight_fwd(shard, axis, compute_dtype):
    dtype_only = jnp.zeros((0,), shard.dtype)  # the backward needs the shard's dtype, not its values
    return gather_weight(shard, axis, compute_dtype), dtype_only


def _gather_weight_bwd(axis, compute_dtype, dtype_only, grad_whole):
    # THE GRADIENT OF AN ALL-GATHER IS A REDUCE-SCATTER. Every device used the whole weight on its own rows,
    # so each holds a gradient for the whole weight, [.., D, ..]. REDUCE-SCATTER over "fsdp": the N
    # gradients are summed and device i keeps only slice i, [.., D/N, ..], the slice of its own shard.
    # Each device sends (N-1)/N of a whole weight's gradient in float32; nobody ever holds the sum of
    # the whole thing. The result is the gradient of the loss summed over the rows of ALL devices.
    grad_shard = jax.lax.psum_scatter(grad_whole.astype(jnp.float32), FSDP, scatter_dimension=axis,
                                      tiled=True)
    return (grad_shard.astype(dtype_only.dtype),)


gather_weight.defvjp(_gather_weight_fwd, _gather_weight_bwd)


def gather_params(params, compute_dtype, *, prefix: str = "", drop_leading_axis: bool = False):
    """gather_weight for each tensor of a (sub)tree. Matrices travel in compute_dtype; vectors (the norms) in
    their own dtype, as llama.py computes RMSNorm in float32 (they are tiny). drop_leading_axis: the tree is
    one layer of the stacked "layers" dict, whose L axis the scan has already removed."""
    def gather(path, w):
        axis = fsdp_dim(prefix + llama.path_name(path)) - (1 if drop_leading_axis else 0)
        dtype = (compute_dtype or w.dtype) if w.ndim > 1 else w.dtype
        return gather_weight(w, axis, dtype)

    return jax.tree_util.tree_map_with_path(gather, params)


# ---------------------------------------------------------------------------------------------------------
# 4. AdamW, by hand, on shards
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """The optimizer's settings; alpaca.py's flags hold the recipe's values (Stanford Alpaca: lr 2e-5, betas
    (0.9, 0.999), eps 1e-8, no weight decay, clip 1.0, 3% warmup)."""
    lr: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    grad_clip: float  # max global gradient norm; 0: no clipping
    warmup_steps: int
    total_steps: int


def lr_at(cfg: AdamWConfig, step):
    """Learning rate of update number `step` (0-based), as transformers' get_cosine_schedule_with_warmup:
    linear from 0 over warmup_steps, then cosine down to 0 at total_steps. Like the HF Trainer, the first
    update (step 0) has lr 0 when warmup_steps > 0. Past total_steps it stays 0 (HF's would rise again)."""
    step = jnp.asarray(step, jnp.float32)
    warmup = step / max(1, cfg.warmup_steps)
    progress = jnp.clip((step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps), 0.0, 1.0)
    cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return cfg.lr * jnp.where(step < cfg.warmup_steps, warmup, cosine)


def init_opt_state(params) -> dict:
    """AdamW state sharded exactly like the parameters: mu and nu in float32, and the number of updates
    done so far (a replicated int32 scalar)."""
    def zeros(p):
        return jnp.zeros(p.shape, jnp.float32, device=p.sharding)

    first = jax.tree.leaves(params)[0].sharding
    replicated = NamedSharding(first.mesh, P()) if isinstance(first, NamedSharding) else first
    return {"mu": jax.tree.map(zeros, params), "nu": jax.tree.map(zeros, params),
            "step": jnp.zeros((), jnp.int32, device=replicated)}


def adamw_update(params, grads, opt_state, cfg: AdamWConfig, grad_norm):
    """One AdamW update, elementwise: it runs on whatever each device holds (here: its shards) and needs no
    communication, because the only global quantity, the gradient norm, is passed in.
    Returns (params, opt_state, lr). Math as torch.optim.AdamW and optax.adamw:
        g <- g * min(1, clip / |g|)           global-norm clipping
        mu <- b1 mu + (1 - b1) g;  nu <- b2 nu + (1 - b2) g^2
        p <- p - lr * (mu / (1 - b1^t) / (sqrt(nu / (1 - b2^t)) + eps) + wd * p)   decoupled weight decay
    """
    step = opt_state["step"]
    lr = lr_at(cfg, step)
    t = (step + 1).astype(jnp.float32)
    scale = jnp.where(grad_norm > cfg.grad_clip, cfg.grad_clip / grad_norm, 1.0) if cfg.grad_clip else 1.0

    def update(path, p, g, mu, nu):
        g = g.astype(jnp.float32) * scale
        mu = cfg.b1 * mu + (1 - cfg.b1) * g
        nu = cfg.b2 * nu + (1 - cfg.b2) * g * g
        u = (mu / (1 - cfg.b1 ** t)) / (jnp.sqrt(nu / (1 - cfg.b2 ** t)) + cfg.eps)
        p32 = p.astype(jnp.float32)
        # Weight decay for the matrices (embed included), not the norm weights: HF Trainer's rule.
        if cfg.weight_decay and not llama.path_name(path).endswith("norm"):
            u = u + cfg.weight_decay * p32
        return (p32 - lr * u).astype(p.dtype), mu, nu

    out = jax.tree_util.tree_map_with_path(update, params, grads, opt_state["mu"], opt_state["nu"])
    pick = lambda i: jax.tree.map(lambda _, o: o[i], params, out)  # noqa: E731  (unzip the tree of triples)
    return pick(0), {"mu": pick(1), "nu": pick(2), "step": step + 1}, lr


# ---------------------------------------------------------------------------------------------------------
# 5. The training state and the train step
# ---------------------------------------------------------------------------------------------------------
# One state for both kinds of fine-tune, so that the loop, checkpoints and logs never ask which one runs:
#   "trained"    what the update changes: every weight (its FSDP shards), or with LoRA the adapters
#   "opt_state"  AdamW's mu and nu, shaped and sharded like "trained", and the number of updates done
#   "frozen"     what the loss reads and no update changes: {} for a full fine-tune, LoRA's base weights
# A checkpoint holds "trained" and "opt_state"; "frozen" is read from the model again.
#
# LoRA on the same step (README: "LoRA"): the frozen base is split and gathered as above, but stop_gradient
# keeps autodiff out of it: no weight gradient, NO REDUCE-SCATTER. The adapters (80 MB for 7B at rank 8) are
# replicated; one all-reduce of their gradient per step keeps every copy equal, bit for bit.


def lora_specs(mc: llama.LlamaConfig, lc: llama.LoraConfig):
    """PartitionSpecs of the adapter tree: replicated (P()), see above."""
    return jax.tree.map(lambda _: P(), llama.lora_shapes(mc, lc), is_leaf=lambda s: isinstance(s, tuple))


def init_lora_params(mc: llama.LlamaConfig, lc: llama.LoraConfig, key, mesh: Mesh):
    """llama.init_lora, replicated on every device of the mesh."""
    return jax.jit(lambda k: llama.init_lora(mc, lc, k),
                   out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), lora_specs(mc, lc)))(key)


def state_specs(mc: llama.LlamaConfig, mesh: Mesh, lora: llama.LoraConfig | None = None) -> dict:
    """The PartitionSpec of every leaf of the training state; checks divisibility."""
    params = partition_specs(llama.param_shapes(mc), mesh)
    trained = params if lora is None else lora_specs(mc, lora)
    return {"trained": trained, "opt_state": {"mu": trained, "nu": trained, "step": P()},
            "frozen": {} if lora is None else params}


def abstract_state(mc: llama.LlamaConfig, mesh: Mesh, param_dtype, lora: llama.LoraConfig | None = None):
    """The training state as jax.ShapeDtypeStructs with their shardings, weights in param_dtype (adapters and
    AdamW in float32): what the step compiles for and a checkpoint is read into, with no weight in memory."""
    def struct(shapes, dtype):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes,
                            is_leaf=lambda s: isinstance(s, tuple))

    params = struct(llama.param_shapes(mc), param_dtype)
    trained = params if lora is None else struct(llama.lora_shapes(mc, lora), jnp.float32)
    moments = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trained)
    shapes = {"trained": trained, "frozen": {} if lora is None else params,
              "opt_state": {"mu": moments, "nu": moments, "step": jax.ShapeDtypeStruct((), jnp.int32)}}
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                        shapes, state_specs(mc, mesh, lora))


def init_state(mc: llama.LlamaConfig, params, lora: llama.LoraConfig | None = None, key=None) -> dict:
    """The state of a fresh fine-tune of `params` (sharded as param_specs): every weight trained, or with lora
    new adapters (from `key`) trained on the frozen params."""
    if lora is None:
        return {"trained": params, "opt_state": init_opt_state(params), "frozen": {}}
    adapters = init_lora_params(mc, lora, key, jax.tree.leaves(params)[0].sharding.mesh)
    return {"trained": adapters, "opt_state": init_opt_state(adapters), "frozen": params}


def _local_loss(mc, compute_dtype, remat, lora: llama.LoraConfig | None):
    """(loss sum, loss tokens) of this device's rows as a function of what is trained, from this device's
    shards of the weights (and, with LoRA, the adapters, which every device holds whole)."""
    def layer_hook(layer):  # inside llama.py's scan: one layer's shards -> the whole layer, in compute_dtype
        return gather_params(layer, compute_dtype, prefix="layers/", drop_leading_axis=True)

    def loss(trained, batch, frozen):
        weights, adapters = (trained, None) if lora is None else (jax.lax.stop_gradient(frozen), trained)
        # The top-level tensors (embed, final_norm, lm_head) are gathered once, here; the layers stay
        # shards, gathered one at a time by the hook (and again in the backward pass when remat is on).
        top = gather_params({k: v for k, v in weights.items() if k != "layers"}, compute_dtype)
        whole = {**top, "layers": weights["layers"]}
        return llama.loss_fn(whole, batch, mc, compute_dtype=compute_dtype, layer_hook=layer_hook,
                             remat=remat, lora=adapters, lora_scale=lora.scale if lora else 1.0)

    return loss


def make_train_step(mc: llama.LlamaConfig, mesh: Mesh, opt_cfg: AdamWConfig, *, compute_dtype=jnp.bfloat16,
                    num_micro_batches: int = 1, remat: bool = True,
                    lora: llama.LoraConfig | None = None):
    """step(state, batch) -> (state, metrics), jitted, the state donated ("frozen" comes back unchanged, in
    the same buffers).

    state: init_state's, sharded as state_specs; with lora (a llama.LoraConfig) the adapters are trained.
    batch: the BATCH_KEYS dict of global [R, T] arrays with rows split over "fsdp" (batch_sharding), R a
    multiple of fsdp x num_micro_batches. metrics (replicated float32 scalars): loss (mean over every loss
    token of the global batch), n_tokens, grad_norm (global, before clipping), lr (of this update)."""
    M = num_micro_batches
    specs = state_specs(mc, mesh, lora)  # also checks divisibility, now rather than later
    grad_of_loss = jax.value_and_grad(_local_loss(mc, compute_dtype, remat, lora), has_aux=True)

    def local_step(state, batch):
        # Shapes here are one device's: weight shards [.., D/N, ..], rows [R/N, T]; adapters whole.
        micro = jax.tree.map(lambda x: x.reshape(M, -1, *x.shape[1:]), batch)  # [M, R/(N M), T]
        # shard_map (check_vma) types every value as "varying" over fsdp (it may differ between devices: a
        # shard, this device's rows) or "invariant" (the same on all: a replicated adapter, a psum's result).
        # Autodiff keeps the types: the gradient of an invariant input must be invariant, so autodiff would
        # all-reduce it at every use. A varying copy keeps each gradient local until the one psum below.
        trained = jax.lax.pcast(state["trained"], FSDP, to="varying") if lora else state["trained"]

        def accumulate(carry, mb):
            grads, loss_sum, n_tokens = carry
            # Differentiate this device's loss SUM. The reduce-scatters inside (see gather_weight) add the
            # gradients of all devices' rows: every device gets its shard of d(sum over all rows)/d(params).
            (l, n_tok), g = grad_of_loss(trained, mb, state["frozen"])
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, loss_sum + l, n_tokens + n_tok), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
        # Scan carries must have the type of the body's outputs, which differ per device ("varying").
        carry = jax.lax.pcast((zeros, jnp.float32(0), jnp.float32(0)), FSDP, to="varying")
        (grads, loss_sum, n_tokens), _ = jax.lax.scan(accumulate, carry, micro)

        # ALL-REDUCE (psum) of two scalars over "fsdp": the loss sum and the loss-token count of the whole
        # global batch, so that the loss is the mean over all its tokens, not a mean of per-device means.
        loss_sum, n_tokens = jax.lax.psum((loss_sum, n_tokens), FSDP)
        if lora is not None:  # ALL-REDUCE (psum) of the adapters' float32 gradients: 80 MB for 7B at rank 8
            grads = jax.lax.psum(grads, FSDP)
        grads = jax.tree.map(lambda g: g / jnp.maximum(n_tokens, 1.0), grads)  # d(mean loss)/d(shard)

        # The squared global gradient norm. FSDP: every parameter element lives in exactly one shard, so it is
        # the ALL-REDUCE (psum) of one scalar, the shards' squared norms. LoRA: every device has it all.
        sq = sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))
        grad_norm = jnp.sqrt(jax.lax.psum(sq, FSDP) if lora is None else sq)

        new, opt_state, lr = adamw_update(state["trained"], grads, state["opt_state"], opt_cfg, grad_norm)
        metrics = {"loss": loss_sum / jnp.maximum(n_tokens, 1.0), "n_tokens": n_tokens,
                   "grad_norm": grad_norm, "lr": lr}
        return {"trained": new, "opt_state": opt_state, "frozen": state["frozen"]}, metrics

    sharded_step = jax.shard_map(local_step, mesh=mesh, in_specs=(specs, {k: P(FSDP) for k in BATCH_KEYS}),
                                 out_specs=(specs, P()), check_vma=True)
    return jax.jit(lambda state, batch: sharded_step(state, {k: batch[k] for k in BATCH_KEYS}),
                   donate_argnums=0)
