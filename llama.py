"""Llama in plain jax.numpy: config, parameters, forward pass, loss, generation, Hugging Face I/O.

Read top to bottom:
  1. LlamaConfig, read from and written to a Hugging Face config.json.
  2. Parameters: a nested dict of arrays, decoder layers stacked on a leading L axis; LoRA adapters likewise.
  3. The forward pass: embed, one lax.scan over layers (RMSNorm, RoPE, grouped-query attention with a
     causal+segment mask, SwiGLU MLP), final norm, LM head. A per-layer hook lets sharding.py all-gather
     FSDP shards inside the scan without this file knowing about devices.
  4. The loss: summed token cross-entropy under a loss mask, and the number of loss tokens; the FLOPs of
     training on a set of examples (for MFU).
  5. Generation with a KV cache.
  6. Hugging Face safetensors in (streamed, optionally straight into a sharding) and out (sharded, complete
     once config.json is written, last; optionally with LoRA adapters merged), and PEFT adapters in and out.
  7. `python llama.py compare`: check our logits against transformers on a real checkpoint.

Shape letters: B batch, T time (queries), S time (keys), D model width, H query heads, K kv heads,
G = H / K query heads per kv head, E head dim, F MLP width, V vocab, L layers, r LoRA rank.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------------------------------------
# 1. Config
# ---------------------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint or config that we cannot load faithfully. The message names the file and field."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # K (= H for Llama 1 and Llama-2-7B; < H is grouped-query attention)
    head_dim: int  # E (= D / H unless config.json says otherwise)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    sliding_window: int | None = None  # Mistral: equal to full attention while T <= sliding_window

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        """Read a transformers config dict (4.x or 5.x layout). Anything we would silently compute
        differently is an error naming the field."""

        def fail(field, value, why):
            raise CheckpointError(f"{source}: {field}={value!r} is not supported ({why})")

        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            fail("model_type", model_type, "only Llama-architecture models (llama, mistral) are implemented")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            fail("hidden_act", act, "the MLP is SwiGLU with silu")
        for field in ("attention_bias", "mlp_bias"):
            if d.get(field, False):
                fail(field, d[field], "projections have no bias here")
        # transformers 4.x: top-level rope_theta and rope_scaling; 5.x: a rope_parameters dict.
        rope = d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            fail("rope_parameters.rope_type", rope_type, "only plain RoPE is implemented")
        scaling = d.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            fail("rope_scaling", scaling, "only plain RoPE is implemented")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(field), int) or d[field] <= 0:
                raise CheckpointError(f"{source}: {field} must be a positive integer, got {d.get(field)!r}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            fail("num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        window = d.get("sliding_window") if model_type == "mistral" else None

        def token_id(name):
            v = d.get(name)
            return v[0] if isinstance(v, list) else v

        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
            pad_token_id=token_id("pad_token_id"),
            model_type=model_type,
            sliding_window=window,
        )

    def to_hf(self, dtype: str = "float32") -> dict:
        """A config.json that transformers 4.x and 5.x both read: rope_theta is written in both layouts."""
        d = {
            "architectures": ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,  # transformers 4.x name
            "dtype": dtype,  # transformers 5.x name
        }
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d


# ---------------------------------------------------------------------------------------------------------
# 2. Parameters
# ---------------------------------------------------------------------------------------------------------
# A plain dict. Matrices are stored for `x @ W`, i.e. [in, out]: the transpose of PyTorch's nn.Linear
# weight [out, in]. The decoder layers are stacked on a leading L axis so that one lax.scan runs them all:
# compile time does not grow with depth. The table maps our names to Hugging Face's (and says which are
# transposed on the way in and out). q_proj/k_proj are taken as they are: HF checkpoints already use the
# "rotate half" RoPE layout that apply_rope below implements, so no q/k permutation is needed.

LAYER_NAMES = {  # ours: (HF name under model.layers.{i}., transposed?)
    "attn_norm": ("input_layernorm.weight", False),  # [L, D]
    "wq": ("self_attn.q_proj.weight", True),  # [L, D, H*E]
    "wk": ("self_attn.k_proj.weight", True),  # [L, D, K*E]
    "wv": ("self_attn.v_proj.weight", True),  # [L, D, K*E]
    "wo": ("self_attn.o_proj.weight", True),  # [L, H*E, D]
    "mlp_norm": ("post_attention_layernorm.weight", False),  # [L, D]
    "w_gate": ("mlp.gate_proj.weight", True),  # [L, D, F]
    "w_up": ("mlp.up_proj.weight", True),  # [L, D, F]
    "w_down": ("mlp.down_proj.weight", True),  # [L, F, D]
}
TOP_NAMES = {
    "embed": ("model.embed_tokens.weight", False),  # [V, D]: a lookup table, rows are tokens
    "final_norm": ("model.norm.weight", False),  # [D]
    "lm_head": ("lm_head.weight", True),  # [D, V]; absent when tie_word_embeddings (logits = h @ embed.T)
}


def path_name(path) -> str:
    """The name of a parameter from its pytree path: "layers/wq", "embed". PARTITION_RULES (sharding.py),
    checkpoints and error messages all use these names."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def named_leaves(tree, is_leaf=None) -> list:
    """[(path_name, leaf)] of a pytree, in its flattening order."""
    return [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def param_shapes(mc: LlamaConfig) -> dict:
    """Our parameter shapes, the single source of truth for loading, init and sharding."""
    D, F, L, V = mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers, mc.vocab_size
    HE, KE = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    shapes = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D),
            "wq": (L, D, HE),
            "wk": (L, D, KE),
            "wv": (L, D, KE),
            "wo": (L, HE, D),
            "mlp_norm": (L, D),
            "w_gate": (L, D, F),
            "w_up": (L, D, F),
            "w_down": (L, F, D),
        },
        "final_norm": (D,),
    }
    if not mc.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(mc: LlamaConfig, key, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random weights (normal(0, std), norms at 1): for tests and benchmarks, not for training from scratch."""
    shapes = param_shapes(mc)
    named = named_leaves(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(named))
    out = [jnp.ones(s, dtype) if name.endswith("norm") else (std * jax.random.normal(k, s, jnp.float32)).astype(dtype)
           for (name, s), k in zip(named, keys)]
    treedef = jax.tree.structure(shapes, is_leaf=lambda s: isinstance(s, tuple))
    return jax.tree.unflatten(treedef, out)


# LoRA (Hu et al. 2021): a frozen matrix W [in, out] gets a trainable low-rank update, x W + s (x A) B with
# A [in, r], B [r, out] and s = alpha / r. The adapters live in their own tree, stacked like the layers:
#   {"layers": {"wq": {"a": [L, D, r], "b": [L, r, H*E]}, ...}}
# Only the targeted matrices have an entry. The update is never formed as an [in, out] matrix during training:
# that would cost a full-size product per matrix, and the point is that nothing base-sized is differentiated.
# Merging (W + s A B) is for export and generation only.
LORA_TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int  # r
    alpha: float
    targets: tuple = tuple(LORA_TARGETS)  # short names: q, k, v, o, gate, up, down

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_shapes(mc: LlamaConfig, lc: LoraConfig) -> dict:
    layers = param_shapes(mc)["layers"]
    out = {}
    for t in lc.targets:
        L, n_in, n_out = layers[LORA_TARGETS[t]]
        out[LORA_TARGETS[t]] = {"a": (L, n_in, lc.rank), "b": (L, lc.rank, n_out)}
    return {"layers": out}


def init_lora(mc: LlamaConfig, lc: LoraConfig, key) -> dict:
    """Adapters as PEFT initialises them: A is kaiming_uniform(a=sqrt(5)) on torch's [r, in] layout, i.e.
    uniform(-1/sqrt(in), 1/sqrt(in)); B is zero, so the adapted model starts exactly as the base. float32."""
    shapes = lora_shapes(mc, lc)["layers"]
    keys = jax.random.split(key, len(shapes))
    out = {}
    for k, (name, s) in zip(keys, shapes.items()):
        bound = 1.0 / math.sqrt(s["a"][1])
        out[name] = {"a": jax.random.uniform(k, s["a"], jnp.float32, -bound, bound),
                     "b": jnp.zeros(s["b"], jnp.float32)}
    return {"layers": out}


def merge_lora(w, adapter, scale):
    """W + s A B in float32, for numpy or jax arrays, one matrix [in, out] or a stack [L, in, out]."""
    return w.astype(np.float32) + scale * (adapter["a"].astype(np.float32) @ adapter["b"].astype(np.float32))


def merge_lora_params(params, lora, scale):
    """The parameters with every adapted matrix replaced by W + s A B (float32): a plain Llama again."""
    layers = {k: merge_lora(v, lora["layers"][k], scale) if k in lora["layers"] else v
              for k, v in params["layers"].items()}
    return {**params, "layers": layers}


# ---------------------------------------------------------------------------------------------------------
# 3. Forward pass
# ---------------------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    """RMSNorm in float32 whatever the compute dtype: the mean of squares of D values in bf16 loses digits."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return weight.astype(jnp.float32) * x


def rope_tables(positions, head_dim, theta):
    """cos, sin [B, T, E] for rotary embeddings, in float32. Frequencies are laid out as HF does:
    the first and second halves of the head dim form the rotated pairs (i, i + E/2)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [E/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, E]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x [B, T, ..., E] rotated by position: x * cos + rotate_half(x) * sin, with rotate_half(a, b) = (-b, a)."""
    extra = x.ndim - cos.ndim  # head axes between T and E
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def attention_mask(segment_ids):
    """[B, T, T] bool: causal, and a query only sees keys of its own segment. Packed examples never see each
    other; padding (segment 0) only sees padding, which keeps every softmax row non-empty."""
    T = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same


def attention(q, k, v, mask):
    """Grouped-query attention. q [B, T, K, G, E]; k, v [B, S, K, E]; mask [B, T, S].
    Query head h = k*G + g uses kv head k, which is HF's repeat_kv order. Scores and softmax in float32."""
    E = q.shape[-1]
    scores = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(E)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bske->btkge", probs, v)


def causal_block_size(T: int) -> int:
    """Query block of causal_attention: 64, or T/16 for long rows (at most 16 blocks: compile time grows
    with their number). A function of T only, never of the hardware."""
    return max(64, T // 16)


def causal_attention(q, k, v, mask, block: int):
    """attention() for a causal mask over the same T positions (S == T), without the blocks above the
    diagonal: query block i (positions [i*block, (i+1)*block)) only scores the keys [0, (i+1)*block), which
    hold every key a causal mask lets it see. Same result as attention(); ceil(T/block) blocks of static shapes,
    about (1 + block/T)/2 of the score work. On CPU, with the small heads of the demo model, it is ~2.5x
    faster than attention() in the forward+backward pass: the [B, K, G, T, S] float32 scores, not the
    matmuls, dominate there. Blocks that no row needs (packed examples of other segments) are still
    computed: skipping them per row needs a hand-written flash-attention backward."""
    B, T, K, G, E = q.shape
    outs = []
    for lo in range(0, T, block):  # the last block may be shorter
        hi = min(lo + block, T)
        scores = jnp.einsum("btkge,bske->bkgts", q[:, lo:hi], k[:, :hi], preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None, lo:hi, :hi], scores / math.sqrt(E), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bske->btkge", probs, v[:, :hi]))
    return jnp.concatenate(outs, axis=1)


def decoder_layer(x, w, cos, sin, mask, mc: LlamaConfig, dtype, kv=None, index=None, lora=None, lora_scale=1.0):
    """One pre-norm decoder layer. x [B, T, D] float32 (the residual stream stays float32);
    matmuls run in `dtype`. With kv = {"k", "v": [B, S, K, E]} (a KV cache) the new keys/values are written
    at `index` and attention runs over the whole cache; the updated cache is returned. lora: this layer's
    adapters {"wq": {"a", "b"}, ...} (see LoraConfig), added to the matrices they name, scaled by lora_scale."""
    B, T, _ = x.shape
    K, E = mc.num_key_value_heads, mc.head_dim
    G = mc.num_attention_heads // K
    w = jax.tree.map(lambda a: a.astype(dtype) if a.ndim > 1 else a, w)  # no-op when the hook already cast
    lora = jax.tree.map(lambda a: a.astype(dtype), lora or {})

    def proj(h, name):  # h @ W, plus the low-rank path (h A) B s where W is adapted (PEFT's order of operations)
        y = h @ w[name]
        return y + ((h @ lora[name]["a"]) @ lora[name]["b"]) * lora_scale if name in lora else y

    h = rms_norm(x, w["attn_norm"], mc.rms_norm_eps).astype(dtype)
    q = apply_rope(proj(h, "wq").reshape(B, T, K, G, E), cos, sin)
    k = apply_rope(proj(h, "wk").reshape(B, T, K, E), cos, sin)
    v = proj(h, "wv").reshape(B, T, K, E)
    if kv is not None:
        k = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), (0, index, 0, 0))
        v = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), (0, index, 0, 0))
        kv = {"k": k, "v": v}
        o = attention(q, k, v, mask)
    else:  # the whole sequence at once, mask from attention_mask(): causal
        block = causal_block_size(T)
        o = causal_attention(q, k, v, mask, block) if T > block else attention(q, k, v, mask)
    o = o.reshape(B, T, K * G * E)
    x = x + proj(o, "wo").astype(jnp.float32)

    h = rms_norm(x, w["mlp_norm"], mc.rms_norm_eps).astype(dtype)
    gate = jax.nn.silu(proj(h, "w_gate"))  # SwiGLU: silu(h W_gate) * (h W_up), then W_down
    x = x + proj(gate * proj(h, "w_up"), "w_down").astype(jnp.float32)
    return x, kv


def _compute_dtype(params, compute_dtype):
    return jnp.dtype(compute_dtype) if compute_dtype is not None else params["layers"]["wq"].dtype


def hidden_states(params, tokens, mc: LlamaConfig, *, positions=None, segment_ids=None, compute_dtype=None,
                  layer_hook: Callable | None = None, remat: bool = False, lora=None, lora_scale: float = 1.0):
    """Final-normed hidden states [B, T, D] float32."""
    B, T = tokens.shape
    if mc.sliding_window is not None and T > mc.sliding_window:
        raise ValueError(f"sequence length {T} exceeds sliding_window={mc.sliding_window}, which is not implemented")
    dtype = _compute_dtype(params, compute_dtype)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    cos, sin = rope_tables(positions, mc.head_dim, mc.rope_theta)
    mask = attention_mask(segment_ids)
    hook = layer_hook or (lambda w: w)

    def body(x, layer):
        # The hook sees one layer's weights (L axis removed) and returns them ready to use: sharding.py
        # all-gathers FSDP shards here, so only one layer is ever whole on a device. The layer's adapters
        # (if any) come along as they are: they are small, and every device holds them whole.
        w, adapters = layer
        x, _ = decoder_layer(x, hook(w), cos, sin, mask, mc, dtype, lora=adapters, lora_scale=lora_scale)
        return x, None

    if remat:  # keep only the layer inputs; the backward pass recomputes the layer (and re-runs the hook)
        body = jax.checkpoint(body)
    x = params["embed"][tokens].astype(jnp.float32)  # [B, T, D]
    x, _ = jax.lax.scan(body, x, (params["layers"], lora["layers"] if lora else None))
    return rms_norm(x, params["final_norm"], mc.rms_norm_eps)


def unembed(params, h, mc: LlamaConfig, compute_dtype=None):
    """Logits [B, T, V] float32 from hidden states: h @ lm_head, or h @ embed.T when tied."""
    dtype = _compute_dtype(params, compute_dtype)
    w = params["embed"].T if mc.tie_word_embeddings else params["lm_head"]  # [D, V]
    return jnp.matmul(h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def forward(params, tokens, mc: LlamaConfig, *, positions=None, segment_ids=None, compute_dtype=None,
            layer_hook: Callable | None = None, remat: bool = False, lora=None, lora_scale: float = 1.0):
    """Logits [B, T, V] float32 for int32 tokens [B, T]. positions restart at 0 for each example packed into
    a row; segment_ids (1, 2, ... per example, 0 for padding) keep packed examples from attending to each
    other. compute_dtype None computes in the parameters' dtype (float32 for parity checks). lora: an
    adapter tree (init_lora's layout) applied with scale lora_scale (LoraConfig.scale = alpha / r)."""
    h = hidden_states(params, tokens, mc, positions=positions, segment_ids=segment_ids, compute_dtype=compute_dtype,
                      layer_hook=layer_hook, remat=remat, lora=lora, lora_scale=lora_scale)
    return unembed(params, h, mc, compute_dtype)


# ---------------------------------------------------------------------------------------------------------
# 4. Loss
# ---------------------------------------------------------------------------------------------------------


def cross_entropy(logits, targets, loss_mask):
    """(summed loss, number of loss tokens), float32. Returning the sum, not the mean, lets the caller divide
    by the token count of the whole global batch rather than average per-device or per-micro-batch means."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((logz - target_logit) * mask), jnp.sum(mask)


def loss_fn(params, batch, mc: LlamaConfig, *, compute_dtype=None, layer_hook=None, remat=False, lora=None,
            lora_scale: float = 1.0):
    """batch: tokens, targets, loss_mask, segment_ids, positions, each [B, T]. targets[b, t] is the token
    that position t predicts; loss_mask says which of those predictions count."""
    logits = forward(params, batch["tokens"], mc, positions=batch["positions"], segment_ids=batch["segment_ids"],
                     compute_dtype=compute_dtype, layer_hook=layer_hook, remat=remat, lora=lora,
                     lora_scale=lora_scale)
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])


# Model FLOPs of a training step, for MFU (nanoGPT/PaLM convention): 6 N per token for the matmuls of the
# forward and backward passes (N = matmul weights, LM head included, embedding lookup excluded) plus the
# attention scores and values, 6 H E per layer and pair of (query, earlier key) of the same example. Both
# run per QUERY head: with grouped-query attention K < H kv heads shrink wk and wv (so N), not the pairs.
# Only useful work is counted: the masked-out blocks that plain attention computes across packed examples,
# padding and the remat recompute are not. Frozen weights (LoRA's base) need no weight gradient: 4 N per token
# (forward, and the backward pass to the activations); the adapters' own rank-r matmuls are left out.


def matmul_weights(mc: LlamaConfig) -> int:
    D, HE, KE = mc.hidden_size, mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    return mc.num_hidden_layers * (2 * D * HE + 2 * D * KE + 3 * D * mc.intermediate_size) + D * mc.vocab_size


def train_flops(mc: LlamaConfig, example_lengths, frozen_weights: bool = False) -> float:
    """FLOPs of one forward + backward pass over examples of these lengths (tokens each), as above."""
    lengths = np.asarray(example_lengths, np.float64)
    pairs = float(np.sum(lengths * (lengths + 1) / 2))
    HE = mc.num_attention_heads * mc.head_dim
    per_token = 4 if frozen_weights else 6
    return per_token * matmul_weights(mc) * float(lengths.sum()) + 6 * mc.num_hidden_layers * HE * 2 * pairs


# ---------------------------------------------------------------------------------------------------------
# 5. Generation with a KV cache
# ---------------------------------------------------------------------------------------------------------


def _forward_cached(params, tokens, start, cache, mc: LlamaConfig, dtype):
    """Run tokens [B, t] at positions start..start+t-1, reading and extending the KV cache
    {"k", "v": [L, B, S, K, E]}. Returns logits of the last position [B, V] and the new cache."""
    B, t = tokens.shape
    S = cache["k"].shape[2]
    positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
    cos, sin = rope_tables(positions, mc.head_dim, mc.rope_theta)
    key_pos = jnp.arange(S)
    mask = jnp.broadcast_to(key_pos[None, None, :] <= positions[:, :, None], (B, t, S))  # causal over the cache

    def body(x, layer):
        w, kv = layer
        x, kv = decoder_layer(x, w, cos, sin, mask, mc, dtype, kv=kv, index=start)
        return x, kv

    x = params["embed"][tokens].astype(jnp.float32)
    x, cache = jax.lax.scan(body, x, (params["layers"], cache))
    h = rms_norm(x[:, -1:], params["final_norm"], mc.rms_norm_eps)
    return unembed(params, h, mc, dtype)[:, 0], cache


def sample_token(logits, key, temperature, top_p):
    """Greedy when temperature == 0; else nucleus sampling: keep the smallest set of tokens whose
    probability reaches top_p, renormalise, sample."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The threshold is the smallest logit still inside the nucleus (the first token is always kept).
    keep = jnp.maximum(jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(params, prompt, mc: LlamaConfig, *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, key=None, eos_token_id: int | None = None, compute_dtype=None):
    """Continue prompts (int32 [B, T0], same length) by up to max_new_tokens tokens.
    Returns int32 [B, max_new_tokens]; after a sequence's EOS the rest is filled with EOS.
    A KV cache: the prompt is run once (prefill) and each new token costs one step over one position."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    eos = mc.eos_token_id if eos_token_id is None else eos_token_id
    key = jax.random.PRNGKey(0) if key is None else key
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1; got "
                         f"{max_new_tokens}, {temperature}, {top_p}")
    limit = min(mc.max_position_embeddings, mc.sliding_window or mc.max_position_embeddings)
    if prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{'max_position_embeddings' if limit == mc.max_position_embeddings else 'sliding_window'}"
                         f"={limit}")
    return _generate_cached(params, prompt, key, mc, max_new_tokens, float(temperature), float(top_p), eos,
              _compute_dtype(params, compute_dtype))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _generate_cached(params, prompt, key, mc, max_new, temperature, top_p, eos, dtype):
    B, T0 = prompt.shape
    S = T0 + max_new
    shape = (mc.num_hidden_layers, B, S, mc.num_key_value_heads, mc.head_dim)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    logits, cache = _forward_cached(params, prompt, 0, cache, mc, dtype)  # prefill

    def step(carry, i):
        logits, cache, done, key = carry
        key, sub = jax.random.split(key)
        tok = sample_token(logits, sub, temperature, top_p)
        tok = jnp.where(done, eos if eos is not None else 0, tok)
        done = done | (tok == eos) if eos is not None else done
        logits, cache = _forward_cached(params, tok[:, None], T0 + i, cache, mc, dtype)
        return (logits, cache, done, key), tok

    done = jnp.zeros((B,), bool)
    _, toks = jax.lax.scan(step, (logits, cache, done, key), jnp.arange(max_new))
    return toks.T


# ---------------------------------------------------------------------------------------------------------
# 6. Hugging Face checkpoints
# ---------------------------------------------------------------------------------------------------------

HF_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "adapter_config.json"]
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # old Llama conversions store RoPE frequencies; we recompute them


def resolve_model_path(path_or_repo_id: str, allow_patterns=None) -> str:
    """A local directory as is; otherwise a Hub repo id, downloaded (only the files we read) into the HF cache.
    The token comes from huggingface_hub's usual sources (HF_TOKEN, `hf auth login`)."""
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    if os.path.exists(path_or_repo_id) or path_or_repo_id.startswith((".", "/", "~")) or path_or_repo_id.count("/") > 1:
        raise CheckpointError(f"{path_or_repo_id}: no such model directory")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path_or_repo_id, allow_patterns=allow_patterns or HF_FILES)
    except Exception as e:  # not found, gated, offline: all are "cannot get this model"
        raise CheckpointError(f"{path_or_repo_id}: not a local directory, and the Hub download failed: "
                              f"{type(e).__name__}: {e}") from e


def _tensor_index(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file, for single-file and sharded checkpoints."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        found = sorted(os.listdir(path))
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (found: {found}); "
                              "only safetensors checkpoints are read")
    from safetensors import safe_open
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def _expected_tensors(mc: LlamaConfig) -> dict[str, tuple]:
    """HF name -> (our path, layer index or None, transposed?, HF shape)."""
    shapes = param_shapes(mc)
    out = {}
    for ours, (hf, t) in TOP_NAMES.items():
        if ours in shapes:
            s = shapes[ours]
            out[hf] = ((ours,), None, t, s[::-1] if t else s)
    for ours, (hf, t) in LAYER_NAMES.items():
        s = shapes["layers"][ours][1:]
        for i in range(mc.num_hidden_layers):
            out[f"model.layers.{i}.{hf}"] = (("layers", ours), i, t, s[::-1] if t else s)
    return out


def read_config(path: str) -> LlamaConfig:
    """The LlamaConfig of a local checkpoint directory's config.json."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise CheckpointError(f"{path}: no config.json")
    with open(cfg_file) as f:
        return LlamaConfig.from_hf(json.load(f), source=cfg_file)


def check_checkpoint(path: str):
    """Read config.json and the safetensors headers of a local checkpoint directory, and check that the
    tensors are exactly those of the config, with the right shapes. Cheap (no tensor is read), so a
    training run calls it before doing anything else. Returns (config, {HF name: file}, expected)."""
    mc = read_config(path)
    where = _tensor_index(path)
    expected = _expected_tensors(mc)
    ignorable = {n for n in where if n.endswith(IGNORED_TENSORS)}
    if mc.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - set(where))
    unexpected = sorted(set(where) - set(expected) - ignorable)
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              f"({len(missing)} in all) for the config in config.json")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                              f"({len(unexpected)} in all): not a plain Llama checkpoint?")
    from safetensors import safe_open
    for file in sorted(set(where[name] for name in expected)):
        with safe_open(file, framework="numpy") as f:
            for name, (_, _, _, shape) in expected.items():
                if where[name] == file and tuple(f.get_slice(name).get_shape()) != tuple(shape):
                    raise CheckpointError(f"{file}: tensor {name} has shape {tuple(f.get_slice(name).get_shape())}, "
                                          f"config.json implies {tuple(shape)}")
    return mc, where, expected


def load_hf(path_or_repo_id: str, *, dtype=jnp.float32, shardings=None):
    """(config, params) from a Hugging Face Llama checkpoint: a local directory or a Hub repo id.

    Streams tensor by tensor from memory-mapped safetensors. With `shardings` (a pytree like the params of
    jax.sharding.Sharding) every device receives only its own slice, read with get_slice, so host memory
    never holds a second copy of the model."""
    path = resolve_model_path(path_or_repo_id)
    mc, where, expected = check_checkpoint(path)

    from safetensors import safe_open
    np_dtype = np.dtype(jnp.dtype(dtype))
    shapes = param_shapes(mc)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="numpy")) for f in sorted(set(where.values()))}
        by_param: dict[tuple, dict] = {}
        for name, (ours, layer, t, shape) in expected.items():
            by_param.setdefault(ours, {})[layer] = (handles[where[name]].get_slice(name), t)

        params: dict = {}
        for ours, parts in by_param.items():
            shape = _at(shapes, ours)
            sharding = _at(shardings, ours) if shardings is not None else None
            read = _reader(parts, len(shape), np_dtype)
            arr = jnp.asarray(read(())) if sharding is None else jax.make_array_from_callback(shape, sharding, read)
            _at(params, ours[:-1], create=True)[ours[-1]] = arr
    return mc, params


def _at(tree, path, create=False):
    """tree[path[0]][path[1]]..., making missing dicts when create."""
    for k in path:
        tree = tree.setdefault(k, {}) if create else tree[k]
    return tree


def _reader(parts, ndim, np_dtype):
    """read(index) for jax.make_array_from_callback: one slice of our (stacked, x @ W oriented) array, read
    from the HF tensors `parts` ({layer or None: (safetensors slice, transposed?)}) and nothing more."""
    def read(index):
        index = tuple(index) + (slice(None),) * (ndim - len(index))
        if None in parts:  # a top-level tensor
            sl, t = parts[None]
            return _read(sl, t, index).astype(np_dtype)
        layers = range(len(parts))[index[0]]
        return np.stack([_read(parts[i][0], parts[i][1], index[1:]) for i in layers]).astype(np_dtype)

    return read


def _read(sl, transposed, index):
    """Read index (in our orientation) from a safetensors slice stored in HF orientation."""
    if transposed:
        return np.asarray(sl[index[1], index[0]]).T
    return np.asarray(sl[index])


def _to_host(x) -> np.ndarray:
    """A whole array on this host, also when it is sharded across processes."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _layers_to_host(x):
    """The layers of a stacked [L, ...] parameter as numpy arrays, in order. Sharded across processes, each
    layer is gathered on its own (a collective: every process must iterate), so devices and hosts hold one
    layer's bytes at a time: gathering a whole stack would put it on every device (11 GB for 13B's w_gate)."""
    if getattr(x, "is_fully_addressable", True):
        yield from np.asarray(jax.device_get(x))  # one process: straight to the host, no device copy
        return
    for i in range(x.shape[0]):
        yield _to_host(_take_layer(x, i))


@jax.jit
def _take_layer(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def hf_tensors(mc: LlamaConfig, params, lora=None, lora_scale: float = 1.0):
    """Yield (HF name, numpy array in HF orientation), one parameter on the host at a time (one stacked
    parameter with one process, one layer of it with several). With adapters, every adapted matrix is merged
    on the host, W + s A B, one layer at a time: no device ever holds a second copy of the model."""
    for ours, (hf, t) in TOP_NAMES.items():
        if ours in params:
            a = _to_host(params[ours])
            yield hf, (a.T if t else a)
    for ours, (hf, t) in LAYER_NAMES.items():
        adapter = jax.tree.map(_to_host, lora["layers"][ours]) if lora and ours in lora["layers"] else None
        for i, w in enumerate(_layers_to_host(params["layers"][ours])):
            if adapter is not None:
                w = merge_lora(w, {"a": adapter["a"][i], "b": adapter["b"][i]}, lora_scale)
            yield f"model.layers.{i}.{hf}", (w.T if t else w)


def save_hf(path: str, mc: LlamaConfig, params, *, dtype=jnp.float32, max_shard_bytes: int = 2 * 1024**3,
            copy_files: list[str] = (), extra_files: dict[str, Any] | None = None, lora=None,
            lora_scale: float = 1.0) -> str:
    """Write a directory that transformers loads: config.json, safetensors (sharded with an index above
    max_shard_bytes, named model-0000k-of-0000n.safetensors as HF does), copies of `copy_files` (e.g. the
    tokenizer.model) and extra JSON files {name: content}. With `lora` (adapters, scale lora_scale), the
    adapted matrices are written merged: a plain Llama.
    config.json, which every loader reads first, is the commit marker (_write_marked): a directory with
    config.json is a complete export, and a failed export leaves a previous one complete and untouched.
    In a multi-process run every process must call this (the gathers are collective); only process 0 writes."""
    np_dtype = np.dtype(jnp.dtype(dtype))

    # Plan the shards from the shapes first, so file names can say "of n" before any tensor is gathered.
    expected = _expected_tensors(mc)
    order = [name for name, _ in _name_order(mc)]
    sizes = {name: int(np.prod(expected[name][3])) * np_dtype.itemsize for name in order}
    shards, current, current_bytes = [], [], 0
    for name in order:
        if current and current_bytes + sizes[name] > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += sizes[name]
    shards.append(current)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    file_of = {name: files[k] for k, names in enumerate(shards) for name in names}

    def write(partial, writer):
        return _write_export(partial, mc, params, np_dtype, writer, files, shards, file_of, sizes, copy_files,
                             extra_files, lora, lora_scale)

    return _write_marked(path, write, "config.json", mc.to_hf(dtype=str(np_dtype)),
                         stale=lambda f: f.startswith("model") and ".safetensors" in f)


def _write_marked(path, write, marker, content, stale=lambda f: False):
    """Write a directory whose JSON file `marker`, written last, says it is complete. No directory is renamed
    (object-store mounts such as Cloud Storage FUSE cannot). write(partial, writer) writes every other file to
    partial(name) = .NAME.partial (on process 0, writer=True; the other processes only join its gathers) and
    returns their names; they are flushed to storage, and only then is the marker removed, the files renamed
    into place, the files of a previous write that this one lacks (stale(name)) deleted, and the marker
    written. A failure while writing leaves a previous directory in `path` complete and untouched (the
    .partial files are removed, by the next write if not by this one); a crash in the short renaming phase
    leaves a directory without the marker, which no reader takes for a complete one."""
    writer = jax.process_index() == 0
    path = os.path.abspath(path)
    if writer:
        os.makedirs(path, exist_ok=True)
        _remove_partial(path)  # left by a write that was killed

    def partial(name):
        return os.path.join(path, f".{name}.partial")

    try:
        written = write(partial, writer)
        for name in written:
            with open(partial(name), "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        if writer:  # nothing half-written is left behind
            _remove_partial(path)
        raise
    if not writer:
        return path
    marker_path = os.path.join(path, marker)
    if os.path.exists(marker_path):
        os.remove(marker_path)
    for name in written:
        os.replace(partial(name), os.path.join(path, name))
    for f in os.listdir(path):
        if stale(f) and f not in written:
            os.remove(os.path.join(path, f))
    _write_json(partial(marker), content)
    os.replace(partial(marker), marker_path)
    return path


def _remove_partial(path):
    for f in os.listdir(path):
        if f.startswith(".") and f.endswith(".partial"):
            os.remove(os.path.join(path, f))


def _write_export(partial, mc, params, np_dtype, writer, files, shards, file_of, sizes, copy_files, extra_files,
                  lora, lora_scale):
    """The files of save_hf but config.json, each to partial(name); returns their names. Tensors are gathered
    one stacked parameter at a time and a shard is written as soon as its last tensor arrives, so host memory
    holds at most one shard."""
    from safetensors.numpy import save_file
    pending: dict[str, dict] = {f: {} for f in files}
    remaining = {f: len(names) for f, names in zip(files, shards)}
    for name, arr in hf_tensors(mc, params, lora, lora_scale):
        if not writer:
            continue
        f = file_of[name]
        pending[f][name] = np.ascontiguousarray(arr.astype(np_dtype))
        remaining[f] -= 1
        if remaining[f] == 0:  # a shard is complete: write it and free its tensors
            save_file(pending.pop(f), partial(f), metadata={"format": "pt"})
    if not writer:
        return []
    written = list(files)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": file_of}
        _write_json(partial("model.safetensors.index.json"), index)
        written.append("model.safetensors.index.json")
    return written + _write_extras(partial, copy_files, extra_files)


def _write_extras(partial, copy_files, extra_files):
    """Copies of copy_files and the JSON files {name: content}, each to partial(name); returns their names."""
    written = []
    for src in copy_files:
        shutil.copy(src, partial(os.path.basename(src)))
        written.append(os.path.basename(src))
    for fname, content in (extra_files or {}).items():
        _write_json(partial(fname), content)
        written.append(fname)
    return written


def _name_order(mc: LlamaConfig):
    """HF tensor names in the order hf_tensors yields them."""
    for ours, (hf, _) in TOP_NAMES.items():
        if ours != "lm_head" or not mc.tie_word_embeddings:
            yield hf, ours
    for ours, (hf, _) in LAYER_NAMES.items():
        for i in range(mc.num_hidden_layers):
            yield f"model.layers.{i}.{hf}", ours


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# PEFT adapters. peft's LoRA on transformers' Llama names the adapters of layer i's q_proj
#   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in]   (our A [in, r], transposed)
#   base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight [out, r]  (our B [r, out], transposed)
# in adapter_model.safetensors, and adapter_config.json gives r, lora_alpha, the target module names and the
# base model. Only what this file computes is read back: plain LoRA (no DoRA, rsLoRA, per-module ranks, bias).
PEFT_PREFIX = "base_model.model.model.layers"


def _peft_module(ours: str) -> str:
    return LAYER_NAMES[ours][0].rsplit(".", 1)[0]  # "wq" -> "self_attn.q_proj"


PEFT_TARGETS = {_peft_module(ours).split(".")[-1]: short for short, ours in LORA_TARGETS.items()}  # q_proj: q


def peft_config(lc: LoraConfig, base_model: str) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": lc.rank,
            "lora_alpha": lc.alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "target_modules": [m for m, short in PEFT_TARGETS.items() if short in lc.targets],
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


def save_peft(path: str, mc: LlamaConfig, lc: LoraConfig, lora, *, base_model: str, copy_files: list[str] = (),
              extra_files: dict[str, Any] | None = None) -> str:
    """Write a PEFT adapter directory (adapter_config.json, adapter_model.safetensors in float32, and the
    extra files, e.g. the tokenizer) that peft.PeftModel.from_pretrained(base, path) loads. adapter_config.json,
    which peft reads first, is the commit marker (_write_marked): written last, so a failed write leaves a
    previous adapter complete. Every process calls it, process 0 writes."""
    from safetensors.numpy import save_file
    tensors = {}
    for ours, adapter in lora["layers"].items():
        a, b = _to_host(adapter["a"]), _to_host(adapter["b"])
        for i in range(mc.num_hidden_layers):
            module = f"{PEFT_PREFIX}.{i}.{_peft_module(ours)}"
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].T, np.float32)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].T, np.float32)

    def write(partial, writer):
        if not writer:
            return []
        save_file(tensors, partial("adapter_model.safetensors"), metadata={"format": "pt"})
        return ["adapter_model.safetensors"] + _write_extras(partial, copy_files, extra_files)

    return _write_marked(path, write, "adapter_config.json", peft_config(lc, base_model))


def read_peft_config(path: str) -> tuple[LoraConfig, str]:
    """(LoraConfig, base_model_name_or_path) of a PEFT adapter directory; anything we would compute
    differently is an error naming the field."""
    cfg_file = os.path.join(path, "adapter_config.json")
    with open(cfg_file) as f:
        d = json.load(f)

    def fail(field, why):
        raise CheckpointError(f"{cfg_file}: {field}={d.get(field)!r} is not supported ({why})")

    if d.get("peft_type") != "LORA":
        fail("peft_type", "only LoRA adapters are read")
    for field in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "layers_to_transform",
                  "modules_to_save"):
        if d.get(field):
            fail(field, "plain LoRA with one rank and alpha for every module")
    if d.get("bias", "none") != "none":
        fail("bias", "adapters without bias")
    targets = d.get("target_modules")
    if targets == "all-linear":
        targets = list(PEFT_TARGETS)
    if not isinstance(targets, list) or not targets or set(targets) - set(PEFT_TARGETS):
        fail("target_modules", f"a list of module names from {list(PEFT_TARGETS)}")
    if not d.get("base_model_name_or_path"):
        fail("base_model_name_or_path", "the base model to apply the adapters to must be named")
    lc = LoraConfig(rank=int(d["r"]), alpha=float(d["lora_alpha"]),
                    targets=tuple(short for m, short in PEFT_TARGETS.items() if m in targets))
    return lc, d["base_model_name_or_path"]


def load_peft(path: str, mc: LlamaConfig, lc: LoraConfig) -> dict:
    """The adapters of a PEFT directory, in init_lora's layout (float32), for a base model of config mc."""
    from safetensors.numpy import load_file
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(file):
        raise CheckpointError(f"{path}: no adapter_model.safetensors")
    tensors = load_file(file)
    shapes = lora_shapes(mc, lc)["layers"]
    out = {}
    for ours, s in shapes.items():
        stacks = {}
        for key, torch_name in (("a", "lora_A"), ("b", "lora_B")):
            layers = []
            for i in range(mc.num_hidden_layers):
                name = f"{PEFT_PREFIX}.{i}.{_peft_module(ours)}.{torch_name}.weight"
                if name not in tensors or tensors[name].shape != s[key][:0:-1]:
                    found = tensors[name].shape if name in tensors else "missing"
                    raise CheckpointError(f"{file}: {name}: {found}, expected {s[key][:0:-1]} for the base model")
                layers.append(tensors[name].T)
            stacks[key] = jnp.asarray(np.stack(layers), jnp.float32)
        out[ours] = stacks
    return {"layers": out}


# ---------------------------------------------------------------------------------------------------------
# 7. `python llama.py compare`: our logits against transformers on a real checkpoint
# ---------------------------------------------------------------------------------------------------------


def compare(model: str, prompt: str) -> dict:
    """Max |logit difference| and top-1 agreement between this file and transformers, float32, CPU."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("compare needs torch and transformers: pip install -r tests/requirements.txt")
    import sentencepiece as spm

    path = resolve_model_path(model)
    if not os.path.exists(os.path.join(path, "tokenizer.model")):
        raise CheckpointError(f"{path}: no tokenizer.model to encode the prompt with")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    mc, params = load_hf(path)
    ids = [mc.bos_token_id] + sp.encode(prompt)
    ours = np.asarray(forward(params, jnp.asarray([ids], jnp.int32), mc))[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    return {"tokens": len(ids), "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
            "top1_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
            "logit_scale": float(np.abs(theirs).max())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    cp = sub.add_parser("compare", help="compare our logits with transformers' on a checkpoint (float32, CPU)")
    cp.add_argument("--model", required=True, help="HF model directory or Hub repo id")
    cp.add_argument("--prompt", default="Below is an instruction that describes a task.")
    args = p.parse_args(argv)
    try:
        print(json.dumps(compare(args.model, args.prompt)))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
