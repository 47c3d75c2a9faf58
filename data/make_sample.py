"""make_sample.py: rebuild data/sample/, the small shards that `train_gpt.py --preset=smoke` trains on.

    python data/make_sample.py [--out data/sample]

The text is the documentation written into the CPython standard library itself: for each public module and submodule,
in sorted order, its docstring and those of the classes, methods, properties and functions it exports (gathered with
`inspect`). That text ships with every Python under the PSF License, so the shards can ship with us; it is English prose
with code, and the same interpreter always gives the same bytes. One module is one document. tokenize_text.py cuts the
stream into exactly 131,072 val tokens (sample_val_000000.bin) and 800,000 train tokens (sample_train_000001.bin).
Run with the Python version named in data/sample/README.md, it reproduces the committed shards byte for byte.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import pkgutil
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Iterator

from tokenize_text import tokenize

import cli_parser  # tokenize_text put the repository on sys.path

VAL_TOKENS, TRAIN_TOKENS = 131_072, 800_000
SAMPLE_PYTHON = "3.11.7"  # the interpreter that made the committed shards (data/sample/README.md)
# Modules whose import has visible side effects (a browser, a printed poem, a GUI), or that only exist for IDLE.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}


def signature(obj) -> str:
    """obj's signature as written in its source. Not inspect.signature's rendering of the live defaults: cgi's
    environ=os.environ would copy this machine's environment into the text, platform's executable=sys.executable its
    paths. Builtins carry a fixed text signature; a function without source gets none."""
    if getattr(obj, "__text_signature__", None):
        try:
            return str(inspect.signature(obj))
        except (TypeError, ValueError):
            return ""
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):  # no source file, or not a def
        return ""
    return f"({ast.unparse(node.args)})" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else ""


def indented(doc: str, indent: str) -> str:
    return "".join(f"{indent}{line}".rstrip() + "\n" for line in doc.splitlines())


def describe(name: str, obj, indent: str = "") -> str:
    """One entry: `def name(signature)` or `class name` and its docstring; for a class, then its public methods and
    properties that have docstrings, sorted by name."""
    if not inspect.isclass(obj):
        return f"{indent}def {name}{signature(obj)}\n{indented(inspect.getdoc(obj) or '', indent + '    ')}"
    entry = f"{indent}class {name}\n{indented(inspect.getdoc(obj) or '', indent + '    ')}"
    for attr, raw in sorted(vars(obj).items()):
        if attr.startswith("_"):
            continue
        if isinstance(raw, property) and raw.__doc__:
            entry += f"\n{indent}    property {attr}\n{indented(inspect.cleandoc(raw.__doc__), indent + '        ')}"
        elif callable(member := getattr(obj, attr, None)) and inspect.getdoc(member):
            entry += "\n" + describe(attr, member, indent + "    ")
    return entry


def module_document(module) -> str:
    """A module's documentation as plain text: its docstring, then the classes and functions it exports (its
    __all__, else the public ones it defines), sorted by name."""
    exported = getattr(module, "__all__", None)
    if isinstance(exported, (list, tuple)):
        names = sorted(set(exported))
    else:
        names = sorted(n for n, obj in vars(module).items()
                       if not n.startswith("_") and getattr(obj, "__module__", None) == module.__name__)
    parts = [f"Module {module.__name__}\n\n{inspect.getdoc(module) or ''}".rstrip() + "\n"]
    for name in names:
        obj = getattr(module, name, None)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            parts.append(describe(name, obj))
    return "\n".join(parts)


def quiet_import(name: str):
    """Imports a module, silencing what some print or warn on import; None if it cannot be imported here."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # deprecated modules warn on import
            return importlib.import_module(name)
    except Exception:  # another platform's module (winreg, msvcrt, ...) or an optional one not built here
        return None


def submodules(package) -> Iterator[str]:
    """The public submodules of a package, recursively; tests and __main__ (which runs code on import) are left out."""
    for info in pkgutil.iter_modules(getattr(package, "__path__", []), prefix=package.__name__ + "."):
        last = info.name.rsplit(".", 1)[1]
        if last.startswith("_") or "test" in last:
            continue
        yield info.name
        if info.ispkg and (module := quiet_import(info.name)) is not None:
            yield from submodules(module)


def stdlib_modules() -> list[str]:
    """The public standard-library modules and their public submodules, sorted by name."""
    names = set()
    for name in sys.stdlib_module_names:
        if not name.startswith("_") and name not in SKIP and (module := quiet_import(name)) is not None:
            names.add(name)
            names.update(submodules(module))
    return sorted(names)


def stdlib_documents() -> Iterator[str]:
    """The documentation of each module of stdlib_modules() that imports here, in that order."""
    for name in stdlib_modules():
        if (module := quiet_import(name)) is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. typing.io warns when looked up
                text = module_document(module)
            yield text


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser.ArgumentParser(description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sample",
                        help="output folder (default: data/sample)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out={args.out} is a file, not a folder. HINT: give a folder (it is created if missing)")
    default = Path(__file__).resolve().parent / "sample"
    if args.out.resolve() != default and (held := sorted(p.name for p in args.out.glob("sample_*.bin"))):
        parser.error(f"--out={args.out} already holds {', '.join(held)}. HINT: choose a new folder; only the "
                     "default, data/sample, is rewritten in place")
    for old in args.out.glob("sample_*.bin"):
        old.unlink()
    documents = ((text, len(text), None) for text in stdlib_documents())
    stats, written = tokenize(documents, args.out, "sample", val_tokens=VAL_TOKENS, shard_tokens=TRAIN_TOKENS,
                              max_tokens=VAL_TOKENS + TRAIN_TOKENS)
    if stats.tokens < VAL_TOKENS + TRAIN_TOKENS:
        print(f"error: the standard library's docstrings gave only {stats.tokens:,} tokens, fewer than "
              f"{VAL_TOKENS + TRAIN_TOKENS:,}. HINT: run this with a full CPython build.", file=sys.stderr)
        return 1
    print(f"Python {sys.version.split()[0]}: {stats.documents} modules -> {stats.tokens:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
