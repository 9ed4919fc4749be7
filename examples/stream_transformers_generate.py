"""Convert a transformers causal LM and generate with it streamed from disk, KV cache included.

Runs offline: it builds a small random-weight GPT-2 (use your own model folder or checkpoint instead).

    python examples/stream_transformers_generate.py [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import pylomin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="a Hugging Face causal-LM folder (default: build a random GPT-2)")
    args = p.parse_args()
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.model_dir
        if src is None:
            torch.manual_seed(0)
            config = transformers.GPT2Config(n_layer=6, n_embd=256, n_head=8, vocab_size=5000)
            src = Path(tmp) / "gpt2-random"
            transformers.GPT2LMHeadModel(config).save_pretrained(src)

        out = pylomin.convert(src, Path(tmp) / "converted", progress=False)  # or: pylomin-convert SRC OUT
        model = pylomin.load_streaming(out, transformers.AutoModelForCausalLM)

        prompt = torch.tensor([[11, 42, 7, 99, 3]])
        kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
        streamed = model.generate(prompt, **kwargs)
        print("streamed :", streamed[0].tolist())

        reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        in_memory = reference.generate(prompt, **kwargs)
        print("in memory:", in_memory[0].tolist())
        print("identical:", torch.equal(streamed, in_memory))
        pylomin.unload_(model)


if __name__ == "__main__":
    main()
