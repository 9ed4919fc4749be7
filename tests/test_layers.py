"""The layers, read from the source with `ast`, and what `import pylomin` and the CLI import in a fresh interpreter.

base (`pylomin.errors`, `pylomin._os`) < format < modeling < converter, runtime < tools, top-level API.
Every `import` and `from ... import` counts, at module level, inside functions and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

import pylomin
from tests import python

PKG = python.ROOT / "pylomin"
BASE = ("pylomin.errors", "pylomin._os")
GATEWAY = "pylomin.converter.cache"  # how a repo id or an unconverted Hugging Face folder reaches the converter


def module_name(path: Path) -> str:
    parts = path.relative_to(python.ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether `name` is a module or package of this checkout's `pylomin`."""
    parts = name.split(".")
    if parts[0] != "pylomin":
        return False
    where = python.ROOT.joinpath(*parts)
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def layer(name: str) -> str | None:
    """The layer of a `pylomin` module; None for a module of another package or a subpackage no layer names."""
    if name in BASE:
        return "base"
    parts = name.split(".")
    if parts[0] != "pylomin":
        return None
    if name == "pylomin" or (len(parts) == 2 and python.ROOT.joinpath(*parts).with_suffix(".py").is_file()):
        return "modeling" if name == "pylomin.modeling" else "api"
    return {"format": "format", "converter": "converter", "runtime": "runtime", "tools": "tools"}.get(parts[1])


def is_torch_nn(name: str) -> bool:
    return name == "torch.nn" or name.startswith("torch.nn.")


@dataclass(frozen=True)
class Import:
    """One module that one statement of `importer` imports (or, for `torch.nn.X`, uses)."""

    importer: str
    where: str  # file:line
    statement: str
    target: str
    deferred: bool  # inside a function: runs when it is called, not when the importer is imported


def _targets(node: ast.Import | ast.ImportFrom | ast.Attribute, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.Attribute):  # `torch.nn.Module` after a plain `import torch`
        return (
            ["torch.nn"] if isinstance(node.value, ast.Name) and node.value.id == "torch" and node.attr == "nn" else []
        )
    base = node.module or ""
    if node.level:  # relative: `from . import x` in package `package`
        parts = package.split(".")
        base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
    # `from pylomin import _os` imports the module `pylomin._os`; `from pylomin import convert`, the package.
    names = [f"{base}.{a.name}" for a in node.names]
    return [name if is_module(name) or is_torch_nn(name) else base for name in names]


def imports_of(importer: str, source: str, where: str = "<source>") -> list[Import]:
    """Every module `source` (the text of module `importer`) imports, each with the statement that imports it."""
    is_package = python.ROOT.joinpath(*importer.split("."), "__init__.py").is_file()
    package = importer if is_package else importer.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, deferred: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Attribute)):
            for target in dict.fromkeys(_targets(node, package)):
                found.append(Import(importer, f"{where}:{node.lineno}", ast.unparse(node), target, deferred))
        for child in ast.iter_child_nodes(node):
            visit(child, deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return found


def all_imports() -> list[Import]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        out += imports_of(module_name(path), path.read_text(), str(path.relative_to(python.ROOT)))
    return out


@dataclass(frozen=True)
class Rule:
    text: str
    broken_by: Callable[[Import], bool]


def _lower_only(importer: str, allowed: tuple[str, ...]) -> Callable[[Import], bool]:
    return lambda i: layer(i.importer) == importer and layer(i.target) not in (None, *allowed)


RULES = {
    "base": Rule(
        "base (`pylomin.errors`, `pylomin._os`) imports no pylomin module",
        lambda i: layer(i.importer) == "base" and i.target.split(".")[0] == "pylomin",
    ),
    "format-base-only": Rule(
        "`pylomin.format` imports only base and itself", _lower_only("format", ("base", "format"))
    ),
    "format-no-nn": Rule(
        "`pylomin.format` knows no modules: no `torch.nn`",
        lambda i: layer(i.importer) == "format" and is_torch_nn(i.target),
    ),
    "modeling": Rule(
        "`pylomin.modeling` imports only base and format", _lower_only("modeling", ("base", "format", "modeling"))
    ),
    "converter": Rule(
        "`pylomin.converter` never imports `pylomin.runtime`, `pylomin.tools` or the top-level API",
        lambda i: layer(i.importer) == "converter" and layer(i.target) in ("runtime", "tools", "api"),
    ),
    "runtime": Rule(
        f"`pylomin.runtime` never imports `pylomin.converter`, but for `{GATEWAY}` inside a function",
        lambda i: (
            layer(i.importer) == "runtime"
            and layer(i.target) == "converter"
            and not (i.target == GATEWAY and i.deferred)
        ),
    ),
    "runtime-below-tools": Rule(
        "`pylomin.runtime` never imports `pylomin.tools` or the top-level API",
        lambda i: layer(i.importer) == "runtime" and layer(i.target) in ("tools", "api"),
    ),
}


@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
def test_no_import_crosses_a_layer_the_wrong_way(rule: Rule) -> None:
    bad = [f"{i.where}: `{i.statement}` imports `{i.target}`" for i in all_imports() if rule.broken_by(i)]
    assert not bad, f"{rule.text}:\n" + "\n".join(bad)


def test_the_runtime_reaches_the_converter_through_one_import() -> None:
    gateways = [i for i in all_imports() if layer(i.importer) == "runtime" and i.target == GATEWAY and i.deferred]
    assert len(gateways) <= 1, f"`{GATEWAY}` imported by the runtime in more than one place, keep one:\n" + "\n".join(
        f"{i.where}: `{i.statement}`" for i in gateways
    )


def test_every_module_is_in_a_layer() -> None:
    loose = [module_name(p) for p in sorted(PKG.rglob("*.py")) if layer(module_name(p)) is None]
    assert not loose, f"modules in no layer (name their package in tests/test_layers.py's `layer`): {loose}"


RULE_CASES = [  # (importer, its source, the rules it breaks)
    ("pylomin.format.manifest", "import torch\nfrom torch import Tensor", []),
    ("pylomin.format.manifest", "from torch import nn", ["format-no-nn"]),
    ("pylomin.format.manifest", "import torch.nn.functional as F", ["format-no-nn"]),
    ("pylomin.format.manifest", "import torch\nx: torch.nn.Module", ["format-no-nn"]),
    ("pylomin.format.manifest", "from pylomin import _os\nfrom pylomin.errors import PylominError", []),
    ("pylomin.format.manifest", "from pylomin.modeling import build_on_meta", ["format-base-only"]),
    ("pylomin.errors", "def f():\n    from pylomin.format import manifest", ["base"]),
    ("pylomin.modeling", "from pylomin.converter import layout", ["modeling"]),
    ("pylomin.converter.convert", "from pylomin import _os\nfrom pylomin.format import manifest", []),
    ("pylomin.converter.convert", "import pylomin", ["converter"]),
    ("pylomin.converter.convert", "from pylomin import load_streaming", ["converter"]),
    ("pylomin.converter.convert", "from ..runtime import store", ["converter"]),
    ("pylomin.converter.convert", "def f():\n    from pylomin.tools.profile import profile", ["converter"]),
    ("pylomin.runtime.store", "from pylomin.converter import cache", ["runtime"]),
    ("pylomin.runtime.store", "def f():\n    from pylomin.converter import cache", []),
    ("pylomin.runtime.store", "def f():\n    from pylomin.converter.cache import converted", []),
    ("pylomin.runtime.store", "def f():\n    from pylomin.converter import hub", ["runtime"]),
    ("pylomin.runtime", "from . import store\nfrom ..converter import layout", ["runtime"]),
    ("pylomin.runtime.lifecycle", "def f():\n    from pylomin.tools.profile import Profile", ["runtime-below-tools"]),
    ("pylomin.runtime.streaming", "import pylomin", ["runtime-below-tools"]),
    ("pylomin.tools.cli", "import pylomin.converter.convert\nfrom pylomin.runtime import store", []),
]


@pytest.mark.parametrize(
    ("importer", "source", "broken"),
    RULE_CASES,
    ids=[f"{c[0]}: {'; '.join(ln.strip() for ln in c[1].splitlines())}" for c in RULE_CASES],
)
def test_the_rules_catch_what_they_name(importer: str, source: str, broken: list[str]) -> None:
    found = sorted({key for i in imports_of(importer, source) for key, rule in RULES.items() if rule.broken_by(i)})
    assert found == broken, f"{importer}: {source!r}"


def test_no_export_is_named_like_a_submodule() -> None:
    # `import pylomin.<name>` sets the package's attribute `<name>` to the submodule: an export of that
    # name would turn into a module as soon as anything imports the submodule.
    submodules = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    clash = sorted(set(pylomin.__all__) & submodules)
    assert not clash, f"exports named like a submodule of `pylomin`: {clash}; rename the module"


def test_every_export_resolves_to_what_type_checkers_see() -> None:
    tree = ast.parse((PKG / "__init__.py").read_text())
    typed: dict[str, str] = {}  # name -> module, from the `if TYPE_CHECKING:` block
    bound: set[str] = set()  # names bound when the package is imported
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            typed |= {
                a.asname or a.name: n.module or "" for n in node.body if isinstance(n, ast.ImportFrom) for a in n.names
            }
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            bound |= {
                t.id
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)
            }
    lazy = pylomin._LAZY
    assert typed == lazy, "the `TYPE_CHECKING` imports and `_LAZY` name different modules"
    assert not set(pylomin.__all__) - set(lazy) - bound, "exported names neither imported nor in `_LAZY`"
    assert not set(lazy) - set(pylomin.__all__), "names in `_LAZY` missing from `__all__`"
    assert set(pylomin.__all__) <= set(dir(pylomin))
    for name in pylomin.__all__:
        value = getattr(pylomin, name)
        assert not isinstance(value, ModuleType), f"`pylomin.{name}` is a module"
        if name in lazy:
            assert value is getattr(importlib.import_module(lazy[name]), name), f"`pylomin.{name}`"
    with pytest.raises(AttributeError, match="no attribute `nope`"):
        pylomin.nope  # noqa: B018


def test_import_pylomin_imports_nothing_heavy() -> None:
    r = python.run("import sys, pylomin; print(' '.join(sorted(sys.modules)))")
    assert r.returncode == 0, r.stderr
    # torch too: the CLI (pylomin.tools.cli) runs pylomin/__init__.py first, and `--help` must not wait for torch.
    heavy = ["torch", "transformers", "tqdm", "pylomin.converter", "pylomin.runtime", "pylomin.tools"]
    loaded = [m for m in heavy if m in r.stdout.split()]
    assert not loaded, f"`import pylomin` imports {loaded}"


def _console_script(name: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.is_file() else pytest.skip(f"no `{name}` console script beside {sys.executable}")


CLI_CASES = [  # (argv, exit status, what it prints)
    (["-m", "pylomin.tools.cli", "--help"], 0, "example:"),
    (["pylomin", "--help"], 0, "example:"),
    (["pylomin", "convert", "--help"], 0, "example:"),
    (["pylomin-convert", "--help"], 0, "example:"),
    (["pylomin", "convert"], 2, "pylomin convert: error: the following arguments are required: src, out_dir"),
    (["pylomin", "convert", "a", "b", "--dtype", "int3"], 2, "pylomin convert: error: argument --dtype"),
    (["pylomin", "run", "m", "--batch", "two"], 2, "pylomin run: error: argument --batch"),
    (["pylomin", "frobnicate"], 2, "pylomin: error: argument COMMAND: invalid choice"),
]


@pytest.mark.parametrize(("command", "status", "says"), CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_help_and_argument_errors_import_no_torch(command: list[str], status: int, says: str) -> None:
    argv = [sys.executable, *command] if command[0] == "-m" else [*_console_script(command[0]), *command[1:]]
    env = {**os.environ, "PYTHONPATH": str(python.ROOT), "PYTHONPROFILEIMPORTTIME": "1"}
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    # The interpreter writes one `import time: ... | module` line to stderr for every module imported.
    imported = {ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    stderr = "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("import time:"))
    assert r.returncode == status, stderr
    assert says in r.stdout + stderr
    assert "pylomin.errors" in imported, "no import times on stderr: the check below would pass whatever ran"
    assert "torch" not in imported, f"`{' '.join(command)}` imports torch"


def test_a_converted_folder_loads_without_the_converter(converted: Callable[..., Path]) -> None:
    folder = converted("bert")
    r = python.run(
        f"""
        import sys, torch, transformers, pylomin
        from tests import models

        model = pylomin.load_streaming({str(folder)!r}, transformers.BertModel)
        with torch.no_grad():
            out = model(models.ids()).last_hidden_state
        assert out.shape == (2, 12, 32) and out.isfinite().all(), out.shape
        print(" ".join(m for m in sorted(sys.modules) if m.startswith("pylomin.converter")))
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [], f"loading a converted folder imports {r.stdout.split()}"
