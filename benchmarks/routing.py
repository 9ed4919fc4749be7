"""Expert routing on a trained mixture-of-experts: how well the next layer's experts can be guessed, and which cache keeps them.

Random weights route tokens about uniformly, so this runs on `stdlib-moe` (benchmarks/harness/trained.py:
Qwen3-MoE, 6 layers of 32 experts, top-4, trained on the standard library's source; trained first
if missing). Decode-like traffic: the first TOKENS tokens of PROMPTS held-out files, one token at a
time through transformers' model with its KV cache (teacher-forced: the file's own next token), the
cache carried from file to file. Hooks record, per token and layer, the experts the router chose.

Prediction: before layer L runs, its router (its gate after its post-attention norm, as the model
feeds it) applied to the residual stream entering L, which is layer L-1's output: the share of the
true top-k found in the guessed top-k, top-(k+2) and top-2k (recall). Layer 0's guess comes from
the embeddings. For contrast: the same with the input norm, and the previous token's experts.

Cache: the traces replayed through `ExpertCache` (the shipped code: LFU, and LFU whose uses decay
with a half-life in passes), LRU, SpecMD's least stale and Belady's oracle, with room for 10 / 25 /
50 % of all experts.
Writes bench-out/bench_routing.json.

    .venv/bin/python -m benchmarks.routing [--prompts 16] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from benchmarks.harness import report, trained
from benchmarks.harness.paths import OUT
from pylomin.runtime.expert_cache import HALF_LIFE, ExpertCache

PROMPTS, TOKENS = 16, 256
SHARES = (0.10, 0.25, 0.50)  # of all experts, across layers
HALF_LIVES = (8, 32, 128)  # passes (tokens, in decoding)

Trace = list[list[list[int]]]  # [token][layer] -> the experts chosen, in the order of the whole run


def record(model: Any, sequences: Sequence[Sequence[int]]) -> tuple[Trace, dict[str, torch.Tensor]]:
    """Decode each sequence a token at a time; the experts chosen, and the guesses' rankings per guess kind.

    Returns the trace and, per kind, a tensor [tokens, layers, 2k] of the experts ranked first by the
    guess made before each layer ran ("post": the layer's own post-attention norm then gate, "input": its input norm;
    "runtime": as `pylomin.runtime.experts` guesses, the layer's gate weight on the router input of the layer before,
    taken before that layer's experts run: the layer before's own guess stands in for layer 0's).
    """
    layers = model.model.layers
    k = model.config.num_experts_per_tok
    chosen: dict[int, list[int]] = {}
    guessed: dict[str, dict[int, torch.Tensor]] = {"post": {}, "input": {}, "runtime": {}}
    gate_input: dict[int, torch.Tensor] = {}

    def before(i: int) -> Callable[..., None]:
        layer = layers[i]

        def hook(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h = args[0] if args else kwargs["hidden_states"]  # h: [1, 1, H], the residual stream entering layer i
            for kind, norm in (("post", layer.post_attention_layernorm), ("input", layer.input_layernorm)):
                logits = layer.mlp.gate(norm(h))[0]  # [1, E]
                guessed[kind][i] = logits[0].topk(2 * k).indices
            before_input = gate_input.get(i - 1, h.reshape(1, -1)) if i else h.reshape(1, -1)
            scores = torch.nn.functional.linear(before_input, layer.mlp.gate.weight)  # [1, E]
            guessed["runtime"][i] = scores[0].topk(2 * k).indices

        return hook

    def gate_in(i: int) -> Callable[..., None]:
        def hook(_: Any, args: tuple[Any, ...]) -> None:
            gate_input[i] = args[0].reshape(1, -1)  # [1, H]: the router's input, normed for routing

        return hook

    def routed(i: int) -> Callable[..., None]:
        def hook(_: Any, __: Any, out: tuple[torch.Tensor, ...]) -> None:
            chosen[i] = out[2][0].tolist()  # (logits, weights, indices [1, k])

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
        handles.append(layer.mlp.gate.register_forward_hook(routed(i)))
        handles.append(layer.mlp.gate.register_forward_pre_hook(gate_in(i)))
    import transformers

    trace: Trace = []
    ranks: dict[str, list[torch.Tensor]] = {"post": [], "input": [], "runtime": []}
    try:
        with torch.no_grad():
            for ids in sequences:
                cache = transformers.DynamicCache(config=model.config)
                for token in ids:
                    model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
                    trace.append([chosen[i] for i in range(len(layers))])
                    for kind in ranks:
                        ranks[kind].append(torch.stack([guessed[kind][i] for i in range(len(layers))]))
    finally:
        for h in handles:
            h.remove()
    return trace, {kind: torch.stack(r) for kind, r in ranks.items()}


def recall(trace: Trace, ranked: torch.Tensor, width: int) -> list[float]:
    """Per layer, the share of the chosen experts found among the first `width` of the guess."""
    k = len(trace[0][0])
    true = torch.tensor(trace)  # [T, L, k]
    found = (ranked[:, :, :width, None] == true[:, :, None, :]).any(2)  # [T, L, k]
    return (found.float().sum(-1) / k).mean(0).tolist()


def repeat_recall(trace: Trace, starts: set[int]) -> list[float]:
    """Per layer, the share of the chosen experts the previous token of the same file chose too."""
    pairs = [(trace[t - 1], trace[t]) for t in range(1, len(trace)) if t not in starts]
    layers, k = len(trace[0]), len(trace[0][0])
    return [sum(len(set(a[i]) & set(b[i])) for a, b in pairs) / (k * len(pairs)) for i in range(layers)]


class LRU:
    """Least recently used, with `ExpertCache`'s `use`: room for `slots` experts; a chosen expert is always kept."""

    def __init__(self, slots: int) -> None:
        self.slots, self.kept, self.hits, self.lookups = slots, OrderedDict[tuple[int, int], None](), 0, 0

    def use(self, group: int, chosen: list[int]) -> None:
        for e in chosen:
            key = (group, e)
            self.lookups += 1
            if key in self.kept:
                self.hits += 1
                self.kept.move_to_end(key)
                continue
            self.kept[key] = None
        busy = {(group, e) for e in chosen}
        for key in list(self.kept):  # oldest first
            if len(self.kept) <= self.slots:
                break
            if key not in busy:
                del self.kept[key]


class LeastStale:
    """SpecMD's "least stale", as read here: drop the expert whose layer went by most often since its last use.

    Staleness counts the visits of the expert's own layer (one a pass), not all accesses, so an
    expert used by every pass is never stale whatever its layer; among equally stale ones, the one
    whose layer comes back last goes first. A chosen expert is always kept.
    """

    def __init__(self, slots: int, groups: int) -> None:
        self.slots, self.groups, self.hits, self.lookups = slots, groups, 0, 0
        self.visits = [0] * groups
        self.last: dict[tuple[int, int], int] = {}  # kept expert -> its layer's visit when last used

    def use(self, group: int, chosen: list[int]) -> None:
        self.visits[group] += 1
        for e in chosen:
            self.lookups += 1
            self.hits += (group, e) in self.last
            self.last[(group, e)] = self.visits[group]
        busy = {(group, e) for e in chosen}

        def worth(key: tuple[int, int]) -> tuple[int, int]:  # the smallest goes
            back = (key[0] - group - 1) % self.groups  # visits of other layers before its own comes back
            return self.last[key] - self.visits[key[0]], -back

        while len(self.last) > self.slots:
            victim = min((k for k in self.last if k not in busy), key=worth, default=None)
            if victim is None:
                break
            del self.last[victim]


def belady(calls: list[tuple[int, list[int]]], slots: int) -> float:
    """The oracle's hit rate: on a miss, drop the kept expert used again last (or keep the newcomer out, if it is)."""
    never = len(calls)
    upcoming: list[dict[tuple[int, int], int]] = [{} for _ in calls]  # call -> expert -> its next call
    seen: dict[tuple[int, int], int] = {}
    for c in range(len(calls) - 1, -1, -1):
        group, chosen = calls[c]
        for e in chosen:
            upcoming[c][(group, e)] = seen.get((group, e), never)
        for e in chosen:
            seen[(group, e)] = c
    kept: dict[tuple[int, int], int] = {}  # expert -> its next call
    hits = lookups = 0
    for c, (group, chosen) in enumerate(calls):
        busy = {(group, e) for e in chosen}
        for key in busy:
            lookups += chosen.count(key[1])
            if key in kept:
                hits += chosen.count(key[1])
            nxt = upcoming[c][key]
            if key in kept or len(kept) < slots:
                kept[key] = nxt
                continue
            victim = max((k for k in kept if k not in busy), key=kept.__getitem__, default=None)
            if victim is not None and kept[victim] > nxt:
                del kept[victim]
                kept[key] = nxt
    return hits / lookups


def _calls(trace: Trace) -> Iterator[tuple[int, list[int]]]:
    for token in trace:
        yield from enumerate(token)


def hit_rates(trace: Trace, expert_bytes: int, experts: int) -> dict[str, dict[str, float]]:
    """Policy -> share of all experts kept -> hit rate over the whole trace (from an empty cache)."""
    calls = list(_calls(trace))
    sizes = dict.fromkeys(range(len(trace[0])), expert_bytes)
    out: dict[str, dict[str, float]] = {}
    for share in SHARES:
        slots = round(share * experts)
        policies: dict[str, Any] = {"LFU (half_life=None)": ExpertCache(slots * expert_bytes, sizes, half_life=None)}
        for h in HALF_LIVES:
            name = f"LFU, half-life {h}" + (" (default)" if h == HALF_LIFE else "")
            policies[name] = ExpertCache(slots * expert_bytes, sizes, half_life=h)
        policies["LRU"] = LRU(slots)
        policies["least stale"] = LeastStale(slots, len(sizes))
        for group, chosen in calls:
            for p in policies.values():
                p.use(group, chosen)
        for name, p in policies.items():
            out.setdefault(name, {})[f"{share:.0%}"] = round(p.hits / p.lookups, 4)
        out.setdefault("Belady (oracle)", {})[f"{share:.0%}"] = round(belady(calls, slots), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=PROMPTS, help="held-out files")
    p.add_argument("--tokens", type=int, default=TOKENS, help="tokens decoded from each")
    args = p.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    folder = trained.moe()
    info = json.loads((folder / "train.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    cfg = model.config
    k, experts_per_layer, layers = cfg.num_experts_per_tok, cfg.num_experts, cfg.num_hidden_layers
    e0 = model.model.layers[0].mlp.experts
    expert_bytes = (e0.gate_up_proj[0].numel() + e0.down_proj[0].numel()) * e0.gate_up_proj.element_size()
    sequences = trained.heldout_ids(args.prompts, args.tokens)

    t0 = time.perf_counter()
    trace, ranks = record(model, sequences)
    t_trace = time.perf_counter() - t0
    starts = {i * args.tokens for i in range(len(sequences))}
    widths = {"top-k": k, "top-(k+2)": k + 2, "top-2k": 2 * k}
    guess = {w: recall(trace, ranks["post"], n) for w, n in widths.items()}
    guess_input = recall(trace, ranks["input"], k)
    guess_runtime = recall(trace, ranks["runtime"], k)
    repeat = repeat_recall(trace, starts)
    every = layers * experts_per_layer
    offsets = torch.arange(layers)[None, :, None] * experts_per_layer
    loads = torch.bincount((torch.tensor(trace) + offsets).flatten(), minlength=every)  # per (layer, expert)

    def overall(per_layer: list[float]) -> float:
        return sum(per_layer[1:]) / (layers - 1)  # the layers guessed from a layer before

    rows = [
        [
            f"{i}",
            "embeddings" if i == 0 else f"layer {i - 1}",
            *(f"{guess[w][i]:.1%}" for w in widths),
            f"{guess_input[i]:.1%}",
            f"{guess_runtime[i]:.1%}",
            f"{repeat[i]:.1%}",
        ]
        for i in range(layers)
    ]
    rows.append(
        [
            f"1-{layers - 1}",
            "the layer before",
            *(f"{overall(guess[w]):.1%}" for w in widths),
            f"{overall(guess_input):.1%}",
            f"{overall(guess_runtime):.1%}",
            f"{overall(repeat):.1%}",
        ]
    )
    print(
        f"{folder.name}: {layers} layers x {experts_per_layer} experts, top-{k}; held-out loss {info['heldout_loss']}"
        f" after {info['steps']} steps ({info['train_wall_s']:.0f} s); {len(trace)} tokens decoded in {t_trace:.0f} s\n"
    )
    print("Recall of the next layer's experts, guessed from the residual stream before it:\n")
    header = [
        "layer",
        "guessed from",
        *(f"{w} (post-attn norm)" for w in widths),
        "top-k (input norm)",
        "top-k (runtime: the router input a layer earlier)",
        "previous token",
    ]
    print(report.table(header, "llrrrrrr", rows))

    t1 = time.perf_counter()
    rates = hit_rates(trace, expert_bytes, every)
    t_sim = time.perf_counter() - t1
    shares = [f"{s:.0%}" for s in SHARES]
    slots = [round(s * every) for s in SHARES]
    print(f"\nExpert cache hit rates ({len(trace)} tokens, {layers} groups of {experts_per_layer} experts):\n")
    header = ["policy", *(f"{s} ({n} experts)" for s, n in zip(shares, slots, strict=True))]
    print(
        report.table(header, "l" + "r" * len(shares), [[n, *(f"{r[s]:.1%}" for s in shares)] for n, r in rates.items()])
    )
    top = loads.sort(descending=True).values
    busiest = {f"{q:.0%}": int((top.cumsum(0) < q * loads.sum()).sum()) + 1 for q in (0.5, 0.9)}
    print(
        f"\nthe most used expert takes {top[0] / loads.sum():.1%} of all choices (uniform: {1 / every:.2%});"
        f" the busiest {busiest['50%']} / {busiest['90%']} of {every} experts take 50 / 90 %;"
        f" {int((loads == 0).sum())} never chosen; simulation {t_sim:.0f} s"
    )

    OUT.mkdir(exist_ok=True)
    dump = dict(
        model=dict(
            folder=str(folder),
            **{key: info[key] for key in ("config", "parameters", "mb", "steps", "tokens_seen", "train_wall_s")},
            **{key: info[key] for key in ("final_train_loss", "heldout_loss", "heldout_top1")},
        ),
        prompts=len(sequences),
        tokens_each=args.tokens,
        trace_s=round(t_trace, 1),
        simulation_s=round(t_sim, 1),
        recall={w: [round(x, 4) for x in v] for w, v in guess.items()},
        recall_overall={w: round(overall(v), 4) for w, v in guess.items()},
        recall_input_norm=[round(x, 4) for x in guess_input],
        recall_runtime=[round(x, 4) for x in guess_runtime],
        recall_previous_token=[round(x, 4) for x in repeat],
        hit_rates=rates,
        busiest_experts_for_share=busiest,
        never_chosen=int((loads == 0).sum()),
        slots=dict(zip(shares, slots, strict=True)),
        expert_bytes=expert_bytes,
    )
    path = OUT / "bench_routing.json"
    path.write_text(json.dumps(dump, indent=1) + "\n")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
