"""Llama in plain jax.numpy: config, parameters, forward pass, loss, generation, Hugging Face I/O.

Read top to bottom:
  1. LlamaConfig, as in a Hugging Face config.json.
  2. Parameters: a dict of arrays, decoder layers stacked on a leading L axis; LoRA adapters likewise.
  3. The forward pass: embed, one lax.scan over layers (RMSNorm, RoPE, grouped-query attention under a causal
     + segment mask, SwiGLU MLP), final norm, LM head. A per-layer hook lets sharding.py all-gather FSDP
     shards inside the scan without this file knowing about devices.
  4. The loss (summed cross-entropy, number of loss tokens) and the FLOPs of training, for MFU.
  5. Generation with a KV cache.
  6. Hugging Face checkpoints and tokenizer in (streamed, optionally straight into a sharding; damage
     names the file) and out (config.json last, the commit marker; LoRA merged, or PEFT's adapter).
  7. The training state's slices in safetensors, which any device layout reads back.

Shape letters: B batch, T time (queries), S time (keys), D model width, H query heads, K kv heads,
G = H / K query heads per kv head, E head dim, F MLP width, V vocab, L layers, r LoRA rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from huggingface_hub import snapshot_download
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

# --- 1. Config ----------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint or config that we cannot load faithfully. The message names the file and field."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:  # field names as in Hugging Face's config.json
    vocab_size: int  # V
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

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        """A transformers config dict (4.x or 5.x); what we would compute otherwise is an error."""

        def fail(field, value, why):
            raise CheckpointError(f"{source}: {field}={value!r} is not supported ({why})")

        if d.get("model_type", "llama") != "llama":
            fail("model_type", d["model_type"], "only Llama is implemented")
        if d.get("hidden_act", "silu") != "silu":
            fail("hidden_act", d["hidden_act"], "the MLP is SwiGLU with silu")
        for field in ("attention_bias", "mlp_bias"):
            if d.get(field, False):
                fail(field, d[field], "projections have no bias here")
        # transformers 4.x: top-level rope_theta and rope_scaling; 5.x: a rope_parameters dict.
        for field in ("rope_parameters", "rope_scaling"):
            spec = d.get(field) or {}
            if spec.get("rope_type", spec.get("type", "default")) != "default":
                fail(field, spec, "only plain RoPE is implemented")
        rope = d.get("rope_parameters") or {}
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for field in sizes:
            if not isinstance(d.get(field), int) or d[field] <= 0:
                raise CheckpointError(f"{source}: {field} must be a positive integer, got {d.get(field)!r}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            fail("num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
        ids = {k: d.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return cls(**{k: d[k] for k in sizes}, num_key_value_heads=kv_heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                   rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                   rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                   max_position_embeddings=d.get("max_position_embeddings", 2048),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   **{k: v[0] if isinstance(v, list) else v for k, v in ids.items()})  # may be a list

    def to_hf(self, dtype: str = "float32") -> dict:
        """A config.json that transformers 4.x and 5.x both read: rope_theta and dtype in both layouts."""
        return {"architectures": ["LlamaForCausalLM"], **dataclasses.asdict(self), "model_type": "llama",
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "dtype": dtype,
                "torch_dtype": dtype}  # transformers 4.x's name


# --- 2. Parameters ------------------------------------------------------------------------------------
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
    """A parameter's name from its pytree path ("layers/wq", "embed"), as sharding.py and errors say."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def named_leaves(tree, is_leaf=None) -> list:
    """[(path_name, leaf)] of a pytree, in its flattening order."""
    return [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def param_shapes(mc: LlamaConfig) -> dict:
    """Our parameter shapes, the single source of truth for loading, init and sharding."""
    D, F, L, V = mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers, mc.vocab_size
    HE, KE = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    layers = {"attn_norm": (L, D), "wq": (L, D, HE), "wk": (L, D, KE), "wv": (L, D, KE), "wo": (L, HE, D),
              "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D)}
    shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not mc.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(mc: LlamaConfig, key, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random weights (normal(0, std), norms at 1), for tests and benchmarks."""
    shapes = param_shapes(mc)
    named = named_leaves(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(named))
    out = [jnp.ones(s, dtype) if name.endswith("norm")
           else (std * jax.random.normal(k, s, jnp.float32)).astype(dtype)
           for (name, s), k in zip(named, keys)]
    return jax.tree.unflatten(jax.tree.structure(shapes, is_leaf=lambda s: isinstance(s, tuple)), out)


# LoRA (Hu et al. 2021): a frozen W [in, out] gets a trainable update, x W + s (x A) B, A [in, r], B [r, out],
# s = alpha / r, in a tree stacked like the layers: {"layers": {"wq": {"a": [L, D, r], "b": [L, r, H*E]}}}.
# Training never forms the update as an [in, out] matrix (a full-size product, differentiated); export does.
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


# --- 3. Forward pass ----------------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    """RMSNorm in float32 whatever the compute dtype: the mean of squares of D values in bf16 loses digits."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return weight.astype(jnp.float32) * x


def rope_tables(positions, head_dim, theta):
    """cos, sin [B, T, E] float32 for rotary embeddings, laid out as HF does: pairs (i, i + E/2) rotate."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [E/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, E]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x [B, T, ..., E] rotated by position: x cos + rotate_half(x) sin, with rotate_half(a, b) = (-b, a)."""
    extra = x.ndim - cos.ndim  # head axes between T and E
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return (xf * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x.dtype)


def attention(q, k, v, mask, causal: bool):
    """Grouped-query attention: q [B, T, K, G, E]; k, v [B, S, K, E]; mask [B, T, S]; query head h = k*G + g
    uses kv head k (HF's repeat_kv order); float32 scores. Causal (S == T): query block [lo, hi) scores keys
    [0, hi) alone, ~2.5x faster on CPU. Blocks of 64, or T/16 for long rows (compile time grows with their
    number). Other packed examples' blocks are still computed (skipping them needs a flash backward)."""
    T, S, E = q.shape[1], k.shape[1], q.shape[-1]
    block = max(64, T // 16) if causal else T
    outs = []
    for lo in range(0, T, block):  # the last block may be shorter
        hi = min(lo + block, T)
        s = hi if causal else S
        scores = jnp.einsum("btkge,bske->bkgts", q[:, lo:hi], k[:, :s], preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None, lo:hi, :s], scores / math.sqrt(E), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bske->btkge", probs, v[:, :s]))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def decoder_layer(x, w, cos, sin, mask, mc: LlamaConfig, dtype, kv=None, index=None, lora=None,
                  lora_scale=1.0):
    """One pre-norm layer on the float32 residual stream x [B, T, D], matmuls in `dtype`. With a KV
    cache kv {"k", "v": [B, S, K, E]}, new keys and values go in at `index`; attention reads it all."""
    B, T, _ = x.shape
    K, E = mc.num_key_value_heads, mc.head_dim
    G = mc.num_attention_heads // K
    w = jax.tree.map(lambda a: a.astype(dtype) if a.ndim > 1 else a, w)  # no-op when the hook already cast
    lora = jax.tree.map(lambda a: a.astype(dtype), lora or {})

    def proj(h, name):  # h @ W, plus (h A) B s where W is adapted (PEFT's order of operations)
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
    o = attention(q, k, v, mask, causal=kv is None).reshape(B, T, K * G * E)
    x = x + proj(o, "wo").astype(jnp.float32)

    h = rms_norm(x, w["mlp_norm"], mc.rms_norm_eps).astype(dtype)
    gate = jax.nn.silu(proj(h, "w_gate"))  # SwiGLU: silu(h W_gate) * (h W_up), then W_down
    x = x + proj(gate * proj(h, "w_up"), "w_down").astype(jnp.float32)
    return x, kv


def unembed(params, h, mc: LlamaConfig, dtype):
    """Logits [B, T, V] float32 from final-normed hidden states: h @ lm_head, or h @ embed.T when tied."""
    w = params["embed"].T if mc.tie_word_embeddings else params["lm_head"]  # [D, V]
    return jnp.matmul(h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def forward(params, tokens, mc: LlamaConfig, *, positions=None, segment_ids=None, compute_dtype=None,
            layer_hook: Callable | None = None, remat: bool = False, lora=None, lora_scale: float = 1.0):
    """Logits [B, T, V] float32 for int32 tokens [B, T]. positions restart at 0 for each example packed into
    a row; segment_ids (1, 2, ... per example, 0 for padding) keep packed examples apart. compute_dtype
    None: the parameters'. lora: init_lora's tree, applied with scale lora_scale (LoraConfig.scale)."""
    B, T = tokens.shape
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else params["layers"]["wq"].dtype
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    cos, sin = rope_tables(positions, mc.head_dim, mc.rope_theta)
    # [B, T, T]: causal, and a query only sees keys of its own segment. Packed examples never see each
    # other; padding (segment 0) only sees padding, which keeps every softmax row non-empty.
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    hook = layer_hook or (lambda w: w)

    def body(x, layer):
        # The hook gets one layer's weights (L axis removed) and returns them ready to use: sharding.py
        # all-gathers FSDP shards here, so only one layer is ever whole on a device. Adapters pass as is.
        w, adapters = layer
        x, _ = decoder_layer(x, hook(w), cos, sin, mask, mc, dtype, lora=adapters, lora_scale=lora_scale)
        return x, None

    if remat:  # keep only the layer inputs; the backward pass recomputes the layer (and re-runs the hook)
        body = jax.checkpoint(body)
    x = params["embed"][tokens].astype(jnp.float32)  # [B, T, D]
    x, _ = jax.lax.scan(body, x, (params["layers"], lora["layers"] if lora else None))
    return unembed(params, rms_norm(x, params["final_norm"], mc.rms_norm_eps), mc, dtype)


# --- 4. Loss ------------------------------------------------------------------------------------------


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
    """batch: tokens, targets (what each position predicts), loss_mask (which count)... each [B, T]."""
    logits = forward(params, batch["tokens"], mc, positions=batch["positions"],
                     segment_ids=batch["segment_ids"], compute_dtype=compute_dtype, layer_hook=layer_hook,
                     remat=remat, lora=lora, lora_scale=lora_scale)
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])


# Model FLOPs of a training step, for MFU (nanoGPT/PaLM convention): 6 N per token for the matmuls of the
# forward and backward passes (N = matmul weights, LM head included, embedding lookup excluded) plus the
# attention scores and values, 6 H E per layer and pair of (query, earlier key) of the same example (per
# QUERY head: K < H kv heads shrink wk and wv, not the pairs). Only useful work counts: not the blocks across
# packed examples, padding, or remat. Frozen weights (LoRA's base) need no weight gradient: 4 N per token.


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


# --- 5. Generation with a KV cache --------------------------------------------------------------------


def generate(params, prompt, mc: LlamaConfig, *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, key=None, eos_token_id: int | None = None, compute_dtype=None):
    """Continue prompts int32 [B, T0] by int32 [B, max_new_tokens] (EOS after a sequence's EOS): the
    prompt runs once (prefill), then a position per token. Arguments out of range: ValueError."""
    prompt = jnp.asarray(prompt, jnp.int32)
    prompt = prompt[None] if prompt.ndim == 1 else prompt
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if prompt.shape[1] + max_new_tokens > mc.max_position_embeddings:
        raise ValueError(f"the prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_position_embeddings ({mc.max_position_embeddings})")
    eos = mc.eos_token_id if eos_token_id is None else eos_token_id
    key = jax.random.PRNGKey(0) if key is None else key
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else params["layers"]["wq"].dtype
    return _generate(params, prompt, key, mc, max_new_tokens, float(temperature), float(top_p), eos, dtype)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _generate(params, prompt, key, mc, max_new, temperature, top_p, eos, dtype):
    B, T0 = prompt.shape
    S = T0 + max_new
    shape = (mc.num_hidden_layers, B, S, mc.num_key_value_heads, mc.head_dim)  # [L, B, S, K, E]
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def run(tokens, start, cache):  # tokens [B, t] at positions start.. -> last logits [B, V], new cache
        positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        cos, sin = rope_tables(positions, mc.head_dim, mc.rope_theta)
        mask = jnp.arange(S)[None, None, :] <= positions[:, :, None]  # [B, t, S]: causal over the cache

        def body(x, layer):
            return decoder_layer(x, layer[0], cos, sin, mask, mc, dtype, kv=layer[1], index=start)

        x, cache = jax.lax.scan(body, params["embed"][tokens].astype(jnp.float32), (params["layers"], cache))
        h = rms_norm(x[:, -1:], params["final_norm"], mc.rms_norm_eps)
        return unembed(params, h, mc, dtype)[:, 0], cache

    def step(carry, i):
        logits, cache, done, key = carry
        key, sub = jax.random.split(key)
        tok = sample_token(logits, sub, temperature, top_p)
        if eos is not None:
            tok = jnp.where(done, eos, tok)
            done = done | (tok == eos)
        logits, cache = run(tok[:, None], T0 + i, cache)
        return (logits, cache, done, key), tok

    logits, cache = run(prompt, 0, cache)  # prefill
    _, toks = jax.lax.scan(step, (logits, cache, jnp.zeros((B,), bool), key), jnp.arange(max_new))
    return toks.T


def sample_token(logits, key, temperature, top_p):
    """Greedy at temperature 0; else nucleus: sample among the fewest tokens whose probability is top_p."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # The threshold is the smallest logit still inside the nucleus (the first token is always kept).
    keep = jnp.maximum(jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True), 1)
    logits = jnp.where(logits < jnp.take_along_axis(sorted_logits, keep - 1, axis=-1), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --- 6. Hugging Face checkpoints ----------------------------------------------------------------------

HF_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model"]  # what we read
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # old Llama conversions store RoPE frequencies; we recompute them


def resolve_model_path(path_or_repo_id: str, allow_patterns=None) -> str:
    """A local directory as is; else a Hub repo id, the files we read downloaded into the HF cache."""
    name = path_or_repo_id
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"{name}: no such model directory")
    try:
        return snapshot_download(name, allow_patterns=allow_patterns or HF_FILES)
    except Exception as e:  # not found, gated, offline: all are "cannot get this model"
        raise CheckpointError(f"{name}: not a local directory, and the Hub download failed: "
                              f"{type(e).__name__}: {e}") from e


# A damaged file (e.g. cut by a failed copy or download) is a CheckpointError naming it, not a traceback.
def _read_json(file: str) -> dict:
    try:
        with open(file, "rb") as f:
            d = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    return d


@contextlib.contextmanager
def _reading(file: str):
    """A SafetensorError in the block (opening or reading `file`) becomes a CheckpointError naming it."""
    try:
        yield
    except SafetensorError as e:
        raise CheckpointError(f"{file}: cannot read this safetensors file (it is cut or damaged: {e})") from e


def read_config(path: str) -> LlamaConfig:
    """The LlamaConfig of a local checkpoint directory's config.json."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise CheckpointError(f"{path}: no config.json")
    return LlamaConfig.from_hf(_read_json(cfg_file), source=cfg_file)


def tokenizer_file(path: str) -> str:
    """A tokenizer.model file as is, or the one of a model directory or Hub repo (downloaded alone)."""
    if os.path.isfile(path):
        return path
    if path.endswith(".model"):
        raise CheckpointError(f"no such file: {path}")
    file = os.path.join(resolve_model_path(path, ["tokenizer.model"]), "tokenizer.model")
    if not os.path.isfile(file):
        raise CheckpointError(f"no tokenizer.model in {path}")
    return file


def load_tokenizer(path: str):
    """The SentencePiece tokenizer of tokenizer_file(path), which must define BOS and EOS."""
    file = tokenizer_file(path)
    try:
        sp = spm.SentencePieceProcessor(model_file=file)
    except Exception as e:  # whatever sentencepiece raises: not a model it can read
        raise CheckpointError(f"{file} is not a SentencePiece model ({e})") from e
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise CheckpointError(f"{file} defines no BOS or EOS token")
    return sp


def _expected_tensors(mc: LlamaConfig) -> dict[str, tuple]:
    """HF name -> HF shape, in the order hf_tensors yields them."""
    shapes = param_shapes(mc)
    out = {hf: shapes[o][::-1] if t else shapes[o] for o, (hf, t) in TOP_NAMES.items() if o in shapes}
    for ours, (hf, t) in LAYER_NAMES.items():
        s = shapes["layers"][ours][1:]
        out.update({f"model.layers.{i}.{hf}": s[::-1] if t else s for i in range(mc.num_hidden_layers)})
    return out


def check_checkpoint(path: str):
    """(config, {HF name: file}, expected), checking from the safetensors headers that a local checkpoint's
    tensors are exactly its config's. Cheap (no tensor is read): a run calls it before anything else."""
    mc = read_config(path)
    index_file, single = (os.path.join(path, f"model.safetensors{x}") for x in (".index.json", ""))
    if os.path.exists(index_file):  # sharded: the index maps tensor names to files
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_file}: no weight_map {{tensor name: file name}}")
        where = {name: os.path.join(path, file) for name, file in weight_map.items()}
    elif os.path.exists(single):
        with _reading(single), safe_open(single, framework="numpy") as f:
            where = {name: single for name in f.keys()}
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (found: "
                              f"{sorted(os.listdir(path))}); only safetensors checkpoints are read")
    expected = _expected_tensors(mc)
    ignorable = {n for n in where if n.endswith(IGNORED_TENSORS)}
    if mc.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - set(where))
    unexpected = sorted(set(where) - set(expected) - ignorable)
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]} ({len(missing)} in all) for the config "
                              "in config.json")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]} ({len(unexpected)} in all): "
                              "not a plain Llama checkpoint?")
    for file in sorted(set(where[name] for name in expected)):
        with _reading(file), safe_open(file, framework="numpy") as f:
            for name in (n for n in expected if where[n] == file):
                shape, implied = tuple(f.get_slice(name).get_shape()), tuple(expected[name])
                if shape != implied:
                    raise CheckpointError(f"{file}: tensor {name} has shape {shape}, config.json implies "
                                          f"{implied}")
    return mc, where, expected


def load_hf(path_or_repo_id: str, *, dtype=jnp.float32, shardings=None):
    """(config, params) of a Hugging Face Llama (a directory or Hub repo id), streamed from safetensors.
    With `shardings` (a pytree like the params) every device reads its own slice: no second copy on host."""
    path = resolve_model_path(path_or_repo_id)
    mc, where, expected = check_checkpoint(path)
    np_dtype = np.dtype(jnp.dtype(dtype))
    with contextlib.ExitStack() as stack:
        files = {}
        for file in sorted(set(where.values())):
            with _reading(file):
                files[file] = stack.enter_context(safe_open(file, framework="numpy"))

        def load(p, shape, sharding=None):
            stacked = len(p) == 2  # layers/NAME [L, ...]: one HF tensor per layer
            hf, t = (LAYER_NAMES if stacked else TOP_NAMES)[p[-1].key]
            names = [f"model.layers.{i}.{hf}" for i in range(mc.num_hidden_layers)] if stacked else [hf]

            def read(index):  # one slice of our array (x @ W oriented), as make_array_from_callback asks
                index = tuple(index) + (slice(None),) * (len(shape) - len(index))
                index = index if stacked else (slice(None),) + index  # a top-level tensor: a stack of one
                parts = []
                for name in names[index[0]]:
                    with _reading(where[name]):
                        sl = files[where[name]].get_slice(name)
                        parts.append(np.asarray(sl[index[2], index[1]]).T if t else np.asarray(sl[index[1:]]))
                return (np.stack(parts) if stacked else parts[0]).astype(np_dtype)

            if sharding is None:
                return jnp.asarray(read(()))
            return jax.make_array_from_callback(shape, sharding, read)

        trees = (param_shapes(mc),) if shardings is None else (param_shapes(mc), shardings)
        return mc, jax.tree_util.tree_map_with_path(load, *trees, is_leaf=lambda s: isinstance(s, tuple))


def weights_fingerprint(path: str) -> str:
    """A cheap fingerprint of a checkpoint's weights (names, shapes, 16 rows each): LoRA resumes' base."""
    _, where, expected = check_checkpoint(path)
    h = hashlib.sha256()
    for name in sorted(expected):
        with _reading(where[name]), safe_open(where[name], framework="numpy") as f:
            sl = f.get_slice(name)
            h.update(f"{name} {sl.get_shape()} {sl.get_dtype()}".encode())
            for r in sorted(set(np.linspace(0, sl.get_shape()[0] - 1, 16).astype(int))):
                h.update(np.ascontiguousarray(sl[int(r):int(r) + 1]).tobytes())
    return h.hexdigest()[:32]


def _to_host(x) -> np.ndarray:
    """A whole array on this host, also when it is sharded across processes (a collective, then)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


_take_layer = jax.jit(functools.partial(jax.lax.dynamic_index_in_dim, keepdims=False))  # x[i], i traced


def hf_tensors(mc: LlamaConfig, params, lora=None, lora_scale: float = 1.0):
    """(HF name, numpy array as HF lays it out), adapters merged; processes gather a layer at a time."""
    for ours, (hf, t) in TOP_NAMES.items():
        if ours in params:
            a = _to_host(params[ours])
            yield hf, (a.T if t else a)
    for ours, (hf, t) in LAYER_NAMES.items():
        x = params["layers"][ours]
        stack = _to_host(x) if getattr(x, "is_fully_addressable", True) else None
        adapter = jax.tree.map(_to_host, lora["layers"][ours]) if lora and ours in lora["layers"] else None
        for i in range(mc.num_hidden_layers):
            w = stack[i] if stack is not None else _to_host(_take_layer(x, i))
            if adapter is not None:
                w = merge_lora(w, {"a": adapter["a"][i], "b": adapter["b"][i]}, lora_scale)
            yield f"model.layers.{i}.{hf}", (w.T if t else w)


def save_hf(path: str, mc: LlamaConfig, params, *, dtype=jnp.float32, max_shard_bytes: int = 2 * 1024**3,
            tokenizer: str | None = None, chat_template: str | None = None, lora=None,
            lora_scale: float = 1.0) -> str:
    """Write a directory that transformers loads: config.json (the commit marker), safetensors (shards
    named as HF does), generation_config.json, the `tokenizer`'s files; `lora` merged (W + lora_scale A B).
    Every process calls this; host memory holds one shard."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    # Plan the shards from the shapes, so that file names can say "of n" before any tensor is gathered.
    sizes = {name: math.prod(shape) * np_dtype.itemsize for name, shape in _expected_tensors(mc).items()}
    shards = [[]]
    for name, nbytes in sizes.items():
        if shards[-1] and sum(sizes[m] for m in shards[-1]) + nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append(name)
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    names = names if len(names) > 1 else ["model.safetensors"]

    def files():  # a shard is gathered, written and freed before the next
        tensors = hf_tensors(mc, params, lora, lora_scale)
        for file, shard in zip(names, shards):
            arrays = {k: np.ascontiguousarray(a, np_dtype) for k, a in itertools.islice(tensors, len(shard))}
            yield file, functools.partial(save_file, arrays, metadata={"format": "pt"})
        if len(names) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {t: file for file, shard in zip(names, shards) for t in shard}}
            yield "model.safetensors.index.json", functools.partial(_write_json, index)
        generation = {"bos_token_id": mc.bos_token_id, "eos_token_id": mc.eos_token_id, "do_sample": False}
        yield "generation_config.json", functools.partial(_write_json, generation)
        yield from tokenizer_files(mc, tokenizer, chat_template) if tokenizer else ()

    return _write_dir(path, "config.json", mc.to_hf(dtype=str(np_dtype)), files(),
                      stale=lambda f: f.startswith("model") and f.endswith((".safetensors", ".index.json")))


def tokenizer_files(mc: LlamaConfig, tokenizer: str, chat_template: str | None = None):
    """(name, write) of tokenizer.model and configs saying LlamaTokenizer, BOS added, legacy: transformers 5
    loads tokenizer.model alone as adding no BOS. No pad token: the vocabulary stays the base model's."""
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True, "add_eos_token": False,
              "legacy": True, "model_max_length": mc.max_position_embeddings, "chat_template": chat_template}
    return [("tokenizer.model", functools.partial(shutil.copyfile, tokenizer)),
            ("tokenizer_config.json", functools.partial(_write_json, config)),
            ("special_tokens_map.json", functools.partial(_write_json, special))]


def _write_json(obj, file):
    with open(file, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


# Every file is written through a temporary name, flushed, then renamed (a file: object-store mounts cannot
# rename directories), with the mode the umask says, as open() gives; safetensors alone would make it 0600.
UMASK = os.umask(0o022)
os.umask(UMASK)


@contextlib.contextmanager
def replaced(path: str, unique: bool = False):
    """Write `path` through a temporary name (unique: its own, where several processes may write at once):
    the block writes the name it is given. On failure nothing is left and the OSError names `path`."""
    tmp = f"{path}{'.' + os.urandom(4).hex() if unique else ''}.partial"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # a full disk, say: name the file, which safetensors does not
        if isinstance(e, OSError) and e.filename:
            raise
        raise OSError(getattr(e, "errno", None), getattr(e, "strerror", None) or str(e), path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_dir(path, marker, content, files, stale=lambda f: False):
    """Write the directory `path`: `files`, (name, write(file)) pairs, under temporary names; then the old
    marker and stale files go and all are renamed, the JSON `marker` last: a failure leaves a previous
    directory whole. Every process iterates `files` (gathers are collectives); process 0 writes."""
    writer, path = jax.process_index() == 0, os.path.abspath(path)
    if writer:
        os.makedirs(path, exist_ok=True)
        for f in (f for f in os.listdir(path) if f.endswith(".partial")):  # what a killed write left
            os.remove(os.path.join(path, f))
    with contextlib.ExitStack() as renames:  # on leaving, the files are renamed, the first entered last
        written = []
        for name, write in itertools.chain([(marker, functools.partial(_write_json, content))], files):
            if writer:
                write(renames.enter_context(replaced(os.path.join(path, name))))
                written.append(name)
        for f in os.listdir(path) if writer else []:
            if f == marker or (stale(f) and f not in written):
                os.remove(os.path.join(path, f))
    return path


# PEFT's names: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in] (our A [in, r]
# transposed), ....lora_B.weight [out, r] (our B [r, out] transposed).
PEFT_PREFIX = "base_model.model.model.layers"


def save_peft(path: str, mc: LlamaConfig, lc: LoraConfig, lora, *, base_model: str,
              tokenizer: str | None = None, chat_template: str | None = None) -> str:
    """What peft.PeftModel.from_pretrained(base, path) loads; adapter_config.json, the marker, goes last."""
    tensors = {}
    for ours, adapter in lora["layers"].items():
        a, b = _to_host(adapter["a"]), _to_host(adapter["b"])
        module = LAYER_NAMES[ours][0].rsplit(".", 1)[0]  # "wq" -> "self_attn.q_proj"
        for i in range(mc.num_hidden_layers):
            tensors[f"{PEFT_PREFIX}.{i}.{module}.lora_A.weight"] = np.ascontiguousarray(a[i].T, np.float32)
            tensors[f"{PEFT_PREFIX}.{i}.{module}.lora_B.weight"] = np.ascontiguousarray(b[i].T, np.float32)
    files = [("adapter_model.safetensors", functools.partial(save_file, tensors, metadata={"format": "pt"}))]
    files += tokenizer_files(mc, tokenizer, chat_template) if tokenizer else []
    modules = [LAYER_NAMES[w][0].split(".")[1] for t, w in LORA_TARGETS.items() if t in lc.targets]  # q_proj
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": lc.rank, "lora_alpha": lc.alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "target_modules": modules}
    return _write_dir(path, "adapter_config.json", config, files)


# --- 7. The training state in safetensors, for any device layout --------------------------------------
# Each process saves its devices' slices of a pytree of jax.Arrays, a tensor NAME@START each (START: the
# slice's first index on each axis). Any layout reads them back, each slice from the saved ones it overlaps.


def local_slices(tree) -> dict:
    """{NAME@START: numpy array}: this process's slices of `tree` (a replicated one once), on the host."""
    slices = {}
    for name, arr in named_leaves(tree):
        for shard in arr.addressable_shards:
            start = ",".join(str(s.indices(n)[0]) for s, n in zip(shard.index, arr.shape))
            slices.setdefault(f"{name}@{start}", shard.data).copy_to_host_async()
    return {k: np.array(v) for k, v in slices.items()}  # copies: the caller may donate the buffers


def load_slices(directory: str, like):
    """A pytree shaped and sharded like `like`, from the local_slices in `directory`'s files."""
    saved = {}
    with contextlib.ExitStack() as files:
        for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
            f = files.enter_context(safe_open(os.path.join(directory, file), framework="numpy"))
            for key in f.keys():
                name, _, start = key.rpartition("@")
                saved.setdefault(name, {}).setdefault(start, f.get_slice(key))  # a replicated slice: once

        def read(name, leaf, index):
            lo, hi = ([s.indices(n)[j] for s, n in zip(index, leaf.shape)] for j in (0, 1))  # per axis
            local, filled = np.empty([b - a for a, b in zip(lo, hi)], leaf.dtype), 0
            for start, sl in saved.get(name, {}).items():
                start = [int(x) for x in start.split(",") if x]
                a = [max(x, s) for x, s in zip(lo, start)]
                b = [min(x, s + n) for x, s, n in zip(hi, start, sl.get_shape())]
                if all(x < y for x, y in zip(a, b)):  # the saved slice overlaps this one
                    part = sl[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, start))]
                    local[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))] = part
                    filled += math.prod(y - x for x, y in zip(a, b))
            if filled != local.size:
                raise CheckpointError(f"{directory}: the saved slices of {name} do not cover [{lo}, {hi})")
            return local

        leaves = [jax.make_array_from_callback(x.shape, x.sharding, functools.partial(read, name, x))
                  for name, x in named_leaves(like)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)
