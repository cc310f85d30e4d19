"""Our logits against transformers' on a real checkpoint (float32, CPU): the parity of llama.py.

    JAX_PLATFORMS=cpu .venv-test/bin/python benchmarks/compare.py --model tests/assets/stories260K \
        --prompt "Once upon a time"

prints one JSON line: the prompt's tokens, the largest |logit difference|, the top-1 agreement and the
largest |logit| (for scale). Needs torch and transformers (tests/requirements.txt). A model that cannot be
read (no tokenizer.model, say) is an error naming the file: exit 2.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

import llama  # noqa: E402


def compare(model: str, prompt: str) -> dict:
    """Max |logit difference| and top-1 agreement between llama.py and transformers, float32, CPU."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("compare needs torch and transformers: pip install -r tests/requirements.txt")

    path = llama.resolve_model_path(model)
    sp = llama.load_tokenizer(path)
    mc, params = llama.load_hf(path)
    ids = [mc.bos_token_id] + sp.encode(prompt)
    ours = np.asarray(llama.forward(params, jnp.asarray([ids], jnp.int32), mc))[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    return {"tokens": len(ids), "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
            "top1_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
            "logit_scale": float(np.abs(theirs).max())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF model directory or Hub repo id")
    p.add_argument("--prompt", default="Below is an instruction that describes a task.")
    args = p.parse_args(argv)
    try:
        print(json.dumps(compare(args.model, args.prompt)))
    except llama.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
