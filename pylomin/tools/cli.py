"""`pylomin-convert` and `pylomin` (convert, info, verify, run, generate, plan, cache): thin argparse front ends returning an exit code."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

# Only what argparse needs: `--help` and argument errors import no torch (importing torch takes 30 times
# as long as `pylomin --help` does in all). Each subcommand imports the converter or the runtime it runs.
from pylomin.errors import PylominError

_USER_ERRORS = (OSError, ValueError, PylominError)  # OSError: missing paths, existing OUT_DIR, disk full
_CONVERT_EXAMPLE = """example:
  pylomin-convert ./bert-large ./bert-large-pylomin            # a Hugging Face model folder
  pylomin-convert model.safetensors out/ --unit leaf --dtype float16
  pylomin-convert ./llama ./llama-int8 --quantize int8          # int8 Linear weights: a quarter of the bytes
"""


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a Hugging Face model folder, a .safetensors / .bin / .pt state dict, or a Hub repo id")
    p.add_argument("out_dir", help="the folder to write (built beside it, renamed into place at the end)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast floating-point tensors")
    p.add_argument("--unit", choices=["block", "leaf"], default="block", help="unit granularity (default: block)")
    p.add_argument("--blocks-per-unit", type=int, default=1, metavar="N", help="blocks per unit file (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--revision", help="with a Hub repo id: branch, tag or commit (default: main)")
    p.add_argument(
        "--model-cls",
        metavar="CLASS",
        help="the transformers class the folder will be loaded with, e.g. transformers.MixtralForCausalLM "
        "(default: the class in config.json); tensors are written in the layout it holds at run time",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="weight-only quantization of the Linear layers (embeddings, norms, biases, tied weights and the "
        "LM head stay as stored)",
    )
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], help="with --quantize int4: inputs per scale (64)")
    p.add_argument("--quantize-head", action="store_true", help="with --quantize: quantize the LM head too")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread: a conversion cleans up as it does on Ctrl-C."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    # `kill`, systemd, a job scheduler or a container stop send SIGTERM, whose default ends the process
    # at once and leaves the temporary folder (as big as the model) behind. Only the main thread can
    # have a handler; the previous one is restored after.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _convert(args: argparse.Namespace) -> int:
    from pylomin.converter.convert import convert
    from pylomin.format import manifest as fmt
    from pylomin.format.quant import DEFAULT_GROUP_SIZE, Int4WeightOnly, Int8WeightOnly
    from pylomin.runtime.quant import check_kernels

    if args.quantize is None and (args.group_size is not None or args.quantize_head):
        raise ValueError("--group-size and --quantize-head go with --quantize int8 or int4")
    if args.quantize == "int8" and args.group_size is not None:
        raise ValueError("--group-size goes with --quantize int4: int8 has one scale per output channel, no group size")
    quantize: Int8WeightOnly | Int4WeightOnly | None = None
    if args.quantize == "int8":
        quantize = Int8WeightOnly(head=args.quantize_head)
    elif args.quantize == "int4":
        quantize = Int4WeightOnly(args.group_size or DEFAULT_GROUP_SIZE, head=args.quantize_head)
    if quantize is not None:
        check_kernels(quantize)  # the converter runs no kernel: a scheme this machine cannot run is refused first

    with _sigterm_raises():
        out = convert(
            args.src,
            args.out_dir,
            dtype=args.dtype,
            unit=args.unit,
            blocks_per_unit=args.blocks_per_unit,
            overwrite=args.overwrite,
            progress=not args.quiet,
            revision=args.revision,
            model_cls=args.model_cls,
            quantize=quantize,
        )
    m = fmt.read(out)
    if not args.quiet:
        print(f"{out}: {len(m.units)} units, {m.nbytes / 2**20:.1f} MiB")
    return 0


def _info(args: argparse.Namespace) -> int:
    from pylomin.format import manifest as fmt

    m = fmt.read(args.folder)
    width = max([len(u.name) for u in m.units] + [4])
    print(f"{'unit':<{width}}  {'tensors':>7}  {'MiB':>9}  dtypes")
    for u in m.units:
        dtypes = ",".join(sorted({t.dtype for t in u.tensors.values()}))
        print(f"{u.name or '(root)':<{width}}  {len(u.tensors):>7}  {u.nbytes / 2**20:>9.2f}  {dtypes}")
    largest = max(m.units, key=lambda u: u.nbytes)
    print(
        f"{len(m.units)} units, {sum(len(u.tensors) for u in m.units)} tensors, {m.nbytes / 2**20:.1f} MiB; "
        f"largest unit `{largest.name}` {largest.nbytes / 2**20:.1f} MiB; {len(m.aliases)} aliases"
    )
    for alias, target in m.aliases.items():
        print(f"alias {alias} -> {target}")
    if m.quantization is not None:
        q = m.quantization
        print(f"quantized {q.scheme}: {len(q.modules)} Linear layers; {len(q.skipped)} kept as stored")
        for name, why in q.skipped.items():
            print(f"  kept {name}: {why}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pylomin.runtime.store import verify

    m = verify(args.folder)
    print(f"{args.folder}: OK ({len(m.units)} unit files, {m.nbytes / 2**20:.1f} MiB checked)")
    return 0


def _run_model(args: argparse.Namespace) -> int:
    import time

    import torch

    from pylomin.modeling import resolve_model_cls
    from pylomin.runtime.model import stream_of
    from pylomin.runtime.streaming import load_streaming
    from pylomin.tools.profile import profile

    model_cls = resolve_model_cls(args.model_cls)
    model = load_streaming(
        args.model,
        model_cls,
        prefetch=args.prefetch,
        memory_budget=args.memory_budget,
        drop_page_cache=False if args.keep_page_cache else None,
        revision=args.revision,
    )
    note = stream_of(model).policy.note
    if note:
        print(note)
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    prof = None
    with torch.no_grad():
        for i in range(args.runs):
            traced = i == args.runs - 1 and (args.trace or args.png)
            with profile(model, trace=args.trace, png=args.png) if traced else contextlib.nullcontext() as prof:
                t0 = time.perf_counter()
                model(ids)
                elapsed = time.perf_counter() - t0
            print(f"forward {i + 1}/{args.runs}: {elapsed:.3f} s")
    if prof is not None:
        print(prof.verdict())
        print(f"trace: {args.trace or '-'}  timeline: {args.png or '-'}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pylomin.tools.generate import generate

    generate(
        args.src,
        args.prompt,
        model_cls=args.model_cls,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        chat=args.chat,
        memory_budget=args.memory_budget,
        revision=args.revision,
        draft=args.draft,
        estimate=not args.no_estimate,
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pylomin.tools.plan import estimate

    print(estimate(args.src, args.model_cls, memory=args.memory, batch=args.batch, context=args.context).describe())
    return 0


def _cache_ls(args: argparse.Namespace) -> int:
    from pylomin.converter import cache

    rows = cache.list_cache(args.cache_dir)
    print(f"pylomin cache: {cache.cache_root(args.cache_dir)}")
    for repo_id, commit, size in rows:
        print(f"{repo_id}  {commit}  {size / 2**20:.1f} MiB")
    print(f"{len(rows)} converted models, {sum(r[2] for r in rows) / 2**20:.1f} MiB")
    return 0


def _cache_rm(args: argparse.Namespace) -> int:
    from pylomin.converter import cache

    freed = cache.remove_from_cache(args.repo_id, args.cache_dir)
    print(f"removed {args.repo_id}: {freed / 2**20:.1f} MiB freed")
    return 0


_GENERATE_EXAMPLE = """example:
  pylomin generate ./llama-pylomin "The capital of France is" --max-new-tokens 32
  pylomin generate org/name "Write a haiku about disks" --chat --do-sample --temperature 0.7 --seed 1
  pylomin generate ./llama-pylomin "def fib(n):" --draft lookup        # candidates copied from the prompt
  pylomin generate ./llama-pylomin "Once upon a time" --draft int4     # the model's own int4 copy drafts

The text goes to stdout as it is made; the speed estimate (before) and what the run measured (after:
tokens/s, the draft's acceptance, bytes read from disk per token, the memory policy's choice) to stderr.
"""


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt with a streamed causal LM",
        epilog=_GENERATE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src", help="a converted folder, a Hugging Face folder or a Hub repo id (converted once into the cache)"
    )
    p.add_argument("prompt", help="the text to continue (with --chat: the user's message)")
    p.add_argument(
        "--model-cls",
        default="transformers.AutoModelForCausalLM",
        metavar="CLASS",
        help="import path (default transformers.AutoModelForCausalLM)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate (default 128)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="with --do-sample")
    p.add_argument("--top-p", type=float, help="with --do-sample")
    p.add_argument("--top-k", type=int, help="with --do-sample")
    p.add_argument("--seed", type=int, help="seed torch's generator first (reproducible sampling)")
    p.add_argument(
        "--chat", action="store_true", help="put the prompt in the tokenizer's chat template as the user's message"
    )
    p.add_argument(
        "--memory-budget",
        default="auto",
        help='"auto" (default: what this process may use), "2GiB", or 0 (least memory)',
    )
    p.add_argument("--revision", help="with a Hub repo id: branch, tag or commit (default: main)")
    p.add_argument(
        "--draft",
        metavar="int4|PATH|lookup",
        help="speculative decoding: int4 (the model's own int4 conversion, made once into the cache), lookup "
        "(candidates copied from the prompt), or a folder / repo id of a small model with the same tokenizer; "
        "greedy output stays the model's own",
    )
    p.add_argument(
        "--no-estimate", action="store_true", help="skip the speed estimate (and its check that the run fits)"
    )
    p.set_defaults(func=_generate)


def _add_plan(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plan",
        help="estimate what a model will keep resident, read per token and decode at",
        epilog="example:\n  pylomin plan ./llama-pylomin --memory 8GiB --context 4096\n  pylomin plan org/name --batch 4\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="a converted folder, a Hugging Face folder or a Hub repo id")
    p.add_argument("--memory", help='the memory to plan for, e.g. "8GiB" (default: what this process may use)')
    p.add_argument("--batch", type=int, default=1, metavar="N", help="sequences decoded together (default 1)")
    p.add_argument(
        "--context", type=int, default=2048, metavar="N", help="tokens per sequence, prompt included (default 2048)"
    )
    p.add_argument(
        "--model-cls",
        default="transformers.AutoModelForCausalLM",
        metavar="CLASS",
        help="import path (default transformers.AutoModelForCausalLM)",
    )
    p.set_defaults(func=_plan)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except BrokenPipeError:
        # The reader went away (`pylomin info DIR | head -1`): stop quietly, as git and coreutils do (they
        # die of SIGPIPE, which a shell reports as 141). stdout now goes to /dev/null, so the flush at
        # exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except _USER_ERRORS as e:
        msg = str(e).splitlines()[0] if isinstance(e, (FileNotFoundError, FileExistsError)) else str(e)
        print(f"{parser.prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing was left behind", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{parser.prog}: terminated (SIGTERM); nothing was left behind", file=sys.stderr)
        return 128 + signal.SIGTERM


def convert_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pylomin-convert`."""
    parser = argparse.ArgumentParser(
        prog="pylomin-convert",
        description="Shard a checkpoint into one safetensors file per unit plus a pylomin.json manifest.",
        epilog=_CONVERT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_convert_args(parser)
    parser.set_defaults(func=_convert)
    return _run(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pylomin`."""
    parser = argparse.ArgumentParser(
        prog="pylomin",
        description="Run PyTorch models whose weights do not fit in memory.",
        epilog="example:\n  pylomin convert ./gpt2 ./gpt2-pylomin\n  pylomin info ./gpt2-pylomin\n  pylomin verify ./gpt2-pylomin\n"
        '  pylomin generate ./llama-pylomin "The capital of France is" --draft lookup\n'
        "  pylomin plan ./llama-pylomin --memory 8GiB --context 4096\n"
        "  pylomin cache ls\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    p = sub.add_parser(
        "convert",
        help="shard a checkpoint into unit files",
        epilog=_CONVERT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_convert_args(p)
    p.set_defaults(func=_convert)
    p = sub.add_parser("info", help="list the units of a converted folder")
    p.add_argument("folder")
    p.set_defaults(func=_info)
    p = sub.add_parser("verify", help="check sizes, headers and checksums of a converted folder")
    p.add_argument("folder")
    p.set_defaults(func=_verify)
    p = sub.add_parser(
        "run",
        help="run random input through a streamed model, optionally traced",
        epilog="example:\n  pylomin run ./bert-pylomin --model-cls transformers.BertModel --trace trace.json --png trace.png\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="a converted folder or a Hub repo id")
    p.add_argument("--model-cls", default="transformers.AutoModel", help="import path (default transformers.AutoModel)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=2, help="forwards; the last one is traced")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument(
        "--memory-budget",
        default="auto",
        help='"auto" (default: what this process may use), "2GiB", or 0 (least memory)',
    )
    p.add_argument("--keep-page-cache", action="store_true", help="never drop pages after use (default: chosen)")
    p.add_argument("--revision")
    p.add_argument("--trace", help="write a Chrome trace JSON (Perfetto, chrome://tracing)")
    p.add_argument("--png", help="write a timeline PNG")
    p.set_defaults(func=_run_model)
    _add_generate(sub)
    _add_plan(sub)
    actions = sub.add_parser("cache", help="the cache of models converted from Hub repo ids").add_subparsers(
        required=True, metavar="ACTION"
    )
    for name, func, helptext in (("ls", _cache_ls, "list converted models"), ("rm", _cache_rm, "remove a model")):
        p = actions.add_parser(name, help=helptext)
        if name == "rm":
            p.add_argument("repo_id")
        p.add_argument("--cache-dir", help="default: $PYLOMIN_CACHE, else ~/.cache/pylomin")
        p.set_defaults(func=func)
    return _run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
