"""The child side of every benchmark: one contender in a fresh process, its result written as each phase ends."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import contenders, internals
from benchmarks.harness.measure import TokenClock


class Child:
    """One contender in this process: its spec, what it loads, and its result, saved as each phase begins and ends.

    The result goes to `spec["out"]` (replaced whole, never half written), so a child that the OOM
    killer or a timeout stops still reports what it finished, and in `step` the phase it was in.
    """

    def __init__(self, spec: dict[str, Any], started: float):
        self.spec = spec
        self.started = started  # time.monotonic() at the process's start: deadlines count from there
        self.out = Path(spec["out"])
        self.offload = Path(spec["offload"])
        self.contender = contenders.CONTENDERS[spec["contender"]]
        self.result: dict[str, Any] = {"notes": [], "step": "start"}

    @property
    def notes(self) -> list[str]:
        return self.result["notes"]

    @property
    def vocab(self) -> int:
        return int(json.loads((Path(self.spec["src"]) / "config.json").read_text())["vocab_size"])

    def seconds_left(self) -> float:
        """Of the spec's `timeout`, counted from the process's start."""
        return float(self.spec["timeout"]) - (time.monotonic() - self.started)

    def save(self, step: str | None = None) -> None:
        if step is not None:
            self.result["step"] = step
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result))
        os.replace(tmp, self.out)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        """A phase: the result is saved as it begins (`step` = `name`: where a killed child was) and as it ends."""
        self.save(name)
        yield self.result
        self.save()

    def load(self, *, drop: bool = False) -> Any:
        """The contender's model (`load_s`: its seconds), from the spec's `folder` where it names one."""
        t0 = time.perf_counter()
        model, note = contenders.load(self.spec["contender"], self.spec, self.offload, drop=drop)
        self.result["load_s"] = time.perf_counter() - t0
        if self.contender.how == "accelerate":
            self.result["api"] = note
            self.notes.append(f"accelerate loaded with: {note}")
        elif note:
            self.notes.append(note)
        return model

    def files(self) -> list[Path]:
        """The files the contender reads its weights from: what a cold run evicts."""
        return contenders.files(self.spec["contender"], self.spec, self.offload)

    def save_tensor(self, tensor: Any) -> None:
        """Beside the result, as `<out>.pt`: outputs the parent compares with `torch.equal`."""
        torch.save(tensor, self.out.with_suffix(".pt"))


def run(spec: dict[str, Any], started: float) -> int:
    """Import what the contender needs (before any baseline), then the case's `measure` (spec "module:function")."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    getattr(transformers, spec["cls"])  # transformers imports model code lazily: resolved before any baseline
    if contenders.CONTENDERS[spec["contender"]].how == "accelerate":
        import accelerate  # noqa: F401
    module, _, name = spec["measure"].partition(":")
    measure = getattr(importlib.import_module(module), name)
    child = Child(spec, started)
    with torch.no_grad():
        rc = measure(child)
    child.save("done")
    return int(rc or 0)


def baseline(cls: str) -> int:
    """What every contender imports (torch and pylomin: this module's imports), nothing built: capped runs' allowance."""
    import accelerate  # noqa: F401
    import transformers

    transformers.logging.set_verbosity_error()
    getattr(transformers, cls)
    return 0


def load_forward_generate(child: Child) -> None:
    """Load; a 1 x `seq` forward, again if time allows (the steady state); then, for a decoder, a greedy
    generate() of `new_tokens` from a `prompt_tokens` prompt, timed per token: the memory ladder's run."""
    spec, r = child.spec, child.result
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, child.vocab, (1, spec["seq"]), generator=g)
    prompt = torch.randint(0, child.vocab, (1, spec["prompt_tokens"]), generator=g)
    encoder = spec.get("kind") == "bert"  # an encoder: forwards only
    r["available_seen"], r["limit_seen"] = internals.read_memory()  # what "auto" decides from, before the load
    with child.phase("load"):
        model = child.load()
        r.update(internals.memory_policy(model))
    times: list[float] = []
    for i in range(2):
        with child.phase("forward" if i == 0 else "forward 2"):
            t0 = time.perf_counter()
            model(x, **({} if encoder else {"use_cache": False}))
            times.append(time.perf_counter() - t0)
            r.update(forward_s=times[-1], forwards=len(times), forward_times=times)
        # A second forward only if it and a generate() (~ prefill + the tokens, each at most a forward's time
        # when the weights are read again per token) still fit in the time left; for an encoder, if it fits.
        left = child.seconds_left()
        if i == 0 and times[0] * (1.5 if encoder else 2 + spec["new_tokens"]) > left:
            child.notes.append(f"one forward only: {times[0]:.1f} s, {left:.0f} s left")
            break
    if encoder:
        return
    with child.phase("generate"):
        clock, n = TokenClock(), spec["new_tokens"]
        kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
        y = model.generate(prompt, streamer=clock, max_new_tokens=n, min_new_tokens=n, **kw)
        r.update(clock.summary(), tokens=y[0, spec["prompt_tokens"] :].tolist(), **internals.memory_policy(model))
