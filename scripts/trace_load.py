"""Which pylomin files `load_streaming` and a first forward run a function of, in order: what a reader follows.

    .venv/bin/python scripts/trace_load.py FOLDER CLASS [--forward-only]

FOLDER is a converted folder of the transformers class CLASS (e.g. `LlamaForCausalLM`); the model is
loaded with the defaults and runs one forward of 8 tokens. Module and class bodies (imports) are not
counted, only functions. "Stops" are the calls that enter a file other than the caller's; "back"
counts the stops into a file that was left before.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import sys
from typing import Any


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("cls")
    p.add_argument("--forward-only", action="store_true", help="trace the first forward only, not the load")
    args = p.parse_args()

    import torch
    import transformers

    import pylomin

    root = os.path.dirname(os.path.abspath(pylomin.__file__))
    first: list[str] = []
    functions: dict[str, set[str]] = collections.defaultdict(set)
    stops: list[str] = []

    def tracer(frame: Any, event: str, arg: Any) -> None:
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(root) and frame.f_code.co_flags & inspect.CO_NEWLOCALS:
            name = os.path.relpath(path, root)
            if name not in first:
                first.append(name)
            functions[name].add(frame.f_code.co_name)
            if not stops or stops[-1] != name:
                stops.append(name)

    x = torch.arange(8).reshape(1, 8)
    if not args.forward_only:
        sys.settrace(tracer)
    model = pylomin.load_streaming(args.folder, getattr(transformers, args.cls))
    sys.settrace(tracer)
    with torch.no_grad():
        model(x)
    sys.settrace(None)
    back = collections.Counter(s for i, s in enumerate(stops) if s in stops[:i])
    print(f"{len(first)} files, {len(stops)} stops, {sum(back.values())} back into a file left before")
    for name in first:
        print(f"  {name:24s} {back[name]:4d} back  {', '.join(sorted(functions[name]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
