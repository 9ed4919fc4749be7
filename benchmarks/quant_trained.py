"""How much of a real model's answers int8 and int4 keep: the Llama trained here on the stdlib's source, by rounding.

The target of `benchmarks.harness.trained` (93 MB fp32, hidden 512, 6 layers, intermediate 1376,
vocab 4096, untied head) converted with `pylomin.convert` to fp32, int8 and int4 at groups of 64 and
32 (its down_proj's 1376 inputs are 43 groups of 32 but no whole number of 64s: at g64 those six
layers stay fp32, and the converter names them), each int4 twice: rounded to nearest on each group's
[min, max] (`rtn`, the rounding before the search) and with the converter's search (`search`:
`pylomin.converter.rounding`). Each folder loaded with `pylomin.load_streaming` and measured on:

- held-out text: the first 64 windows of 256 tokens of the held-out files (`<|endoftext|>` between
  them): cross-entropy in nats per token, the mean KL divergence from fp32's next-token
  distribution, and how often the top-1 token equals fp32's;
- greedy decoding: 32 held-out prompts of 32 tokens (`trained.prompts`, cut), 64 new tokens each: the
  share of tokens equal to fp32's, and the share of positions before the first difference;
- the quantized projections' weights: the relative (Frobenius) error of the dequantized weights;
- the conversion's time: wall and CPU seconds, the fastest of `--repeat` conversions.

    .venv/bin/python -m benchmarks.quant_trained [--repeat 3]

Prints a table and writes bench-out/bench_quant_trained.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import pylomin
from benchmarks.harness import report, trained
from benchmarks.harness.paths import OUT
from pylomin.converter import rounding
from pylomin.format.quant import Int4WeightOnly, parse_scheme

WINDOWS, SEQ, PROMPTS, PROMPT, NEW = 64, 256, 32, 32, 64
# (label, scheme for convert, rounding): None is fp32.
ROWS = [
    ("fp32", None, "-"),
    ("int8", "int8", "absmax"),
    ("int4-g64 rtn", "int4-g64", "rtn"),
    ("int4-g64", "int4-g64", "search"),
    ("int4-g32 rtn", "int4-g32", "rtn"),
    ("int4-g32", "int4-g32", "search"),
]


@contextlib.contextmanager
def _rounding(kind: str) -> Iterator[None]:
    """`rtn`: the search cut to its first candidate, the full [min, max] (round to nearest, as before)."""
    if kind != "rtn":
        yield
        return
    with mock.patch.object(rounding, "_SHRINK", (1.0,)), mock.patch.object(rounding, "_REFITS", 0):
        yield


def heldout(tokenizer: Any) -> torch.Tensor:
    """[WINDOWS, SEQ] token ids: the held-out files' stream, cut into windows from its start."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for path in trained.heldout_files():
        ids += [*tokenizer(trained.read(path))["input_ids"], eos]
        if len(ids) >= WINDOWS * SEQ:
            break
    assert len(ids) >= WINDOWS * SEQ, f"held-out files give {len(ids)} tokens, need {WINDOWS * SEQ}"
    return torch.tensor(ids[: WINDOWS * SEQ]).view(WINDOWS, SEQ)


def prompt_ids(tokenizer: Any) -> torch.Tensor:
    """[PROMPTS, PROMPT]: held-out prompts; 8 tokens longer as text, since text to tokens again can come out shorter."""
    rows = [tokenizer(text)["input_ids"][:PROMPT] for text in trained.prompts(PROMPTS, PROMPT + 8)]
    assert all(len(r) == PROMPT for r in rows), [len(r) for r in rows]
    return torch.tensor(rows)


def weight_error(src: Path, spec: str | None, kind: str) -> float | None:
    """The relative error of the dequantized projection weights (layers the scheme can take), all together."""
    if spec is None:
        return None
    from safetensors.torch import load_file

    scheme = parse_scheme(spec)
    err = norm = 0.0
    for name, w in load_file(src / "model.safetensors").items():
        if not name.endswith("proj.weight") or (isinstance(scheme, Int4WeightOnly) and w.shape[1] % scheme.group_size):
            continue
        with _rounding(kind):
            _, scales = rounding.quantize_weight(w, scheme)
        err += (dequantize(w, scales, scheme) - w).square().sum().item()
        norm += w.square().sum().item()
    return math.sqrt(err / norm)


def dequantize(w: torch.Tensor, scales: torch.Tensor, scheme: Any) -> torch.Tensor:
    """What the stored weight stands for: `w` rounded to nearest against the stored scales, as the converter rounds."""
    if not isinstance(scheme, Int4WeightOnly):
        s = scales.float()[:, None]
        return (w / s).round().clamp(-127, 127) * s
    sz = scales.float().transpose(0, 1).repeat_interleave(scheme.group_size, dim=1)  # [out, in, 2]
    s, z = sz[..., 0], sz[..., 1]
    return (((w - z) / s + 8).round().clamp(0, 15) - 8) * s + z


def convert(src: Path, out: Path, spec: str | None, kind: str, repeat: int) -> dict[str, float]:
    """Convert `repeat` times into `out`: the fastest wall and CPU seconds."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        with _rounding(kind):
            pylomin.convert(src, out, quantize=spec, progress=False, overwrite=True)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return dict(convert_s=min(walls), convert_cpu_s=min(cpus))


def measure(model: Any, data: torch.Tensor, prompts: torch.Tensor, ref: dict[str, Any] | None) -> dict[str, Any]:
    """Cross-entropy, KL from fp32 and top-1 agreement on `data`; greedy tokens against fp32's."""
    ce = kl = same = 0.0
    logprobs = []
    with torch.no_grad():
        for i, x in enumerate(data.split(8)):
            lp = model(input_ids=x).logits[:, :-1].float().log_softmax(-1)  # [8, SEQ - 1, vocab]
            ce -= lp.gather(-1, x[:, 1:, None]).sum().item()
            if ref is not None:
                ref_lp = ref["logprobs"][i]
                kl += (ref_lp.exp() * (ref_lp - lp)).sum().item()
                same += (lp.argmax(-1) == ref_lp.argmax(-1)).sum().item()
            logprobs.append(lp)
        kw = dict(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
        tokens = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)[:, PROMPT:]
    count = data.shape[0] * (SEQ - 1)
    r: dict[str, Any] = dict(ce=ce / count, logprobs=logprobs, tokens=tokens)
    if ref is not None:
        firsts = [int(d.nonzero()[0]) if bool(d.any()) else NEW for d in tokens != ref["tokens"]]
        r.update(
            kl=kl / count,
            top1_equal=same / count,
            greedy_equal=(tokens == ref["tokens"]).float().mean().item(),
            before_first_difference=sum(firsts) / (len(firsts) * NEW),
            median_first_difference=sorted(firsts)[len(firsts) // 2],
        )
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="conversions per row; the fastest is reported")
    args = p.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    t_start = time.perf_counter()
    src = trained.target()
    tokenizer = trained.tokenizer()
    data, prompts = heldout(tokenizer), prompt_ids(tokenizer)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, spec, kind in ROWS:
            folder = Path(tmp) / label.replace(" ", "-")
            r = convert(src, folder, spec, kind, args.repeat)
            r["weight_error"] = weight_error(src, spec, kind)
            model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM)
            r.update(measure(model, data, prompts, results.get("fp32")))
            pylomin.unload_(model)
            results[label] = r
            print(f"  {label}: ce {r['ce']:.4f}, {r['convert_s']:.2f} s to convert", flush=True)
    print(
        f"\n### {src.name}: {WINDOWS} held-out windows of {SEQ} tokens; "
        f"{PROMPTS} prompts of {PROMPT} tokens, {NEW} greedy new tokens\n"
    )
    header = ["weights", "rounding", "weight error", "nats/token", "KL from fp32", "top-1 = fp32"]
    header += ["greedy = fp32", "before 1st difference", "convert s (CPU s)"]
    rows = []
    for label, _, kind in ROWS:
        r = results[label]
        rows.append(
            [
                label.split()[0],
                kind,
                report.num(r["weight_error"], ".4f"),
                f"{r['ce']:.4f}",
                report.num(r.get("kl"), ".5f"),
                f"{r.get('top1_equal', 1.0) * 100:.1f} %",
                f"{r.get('greedy_equal', 1.0) * 100:.1f} %",
                f"{r.get('before_first_difference', 1.0) * 100:.1f} %",
                f"{r['convert_s']:.2f} ({r['convert_cpu_s']:.2f})",
            ]
        )
    print(report.table(header, "llrrrrrrr", rows))
    for r in results.values():
        del r["logprobs"], r["tokens"]
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_quant_trained.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {OUT / 'bench_quant_trained.json'}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
