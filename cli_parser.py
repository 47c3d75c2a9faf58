"""The tools' command-line parser: argparse, except that a bad command line is one line and exit status 1.

argparse's own habit is its whole usage text, then `prog: error: ...`, and exit status 2. Every tool here (sample.py,
export.py, evals/hellaswag.py, data/*.py, records/curves.py) answers bad input the way train_gpt.py does instead:
`prog: error: <what is wrong>. HINT: <prog> --help lists every option`, exit status 1. An option given twice is
refused, as train_gpt.py refuses a setting given twice, rather than silently taking the last. (records/compare.py and
records/curves.py use compare.py's copy of these lines, so that compare.py stays one file that reads anyone's logs;
their usage errors exit 2, since 1 there means that a claim does not hold.)
"""

import argparse
import sys


def given_twice(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """'--name is given twice (a, then b)...' for the first single-valued option args give twice, else None."""
    seen: dict[argparse.Action, list[str]] = {}
    for i, arg in enumerate(args):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if not eq:  # --name VALUE, or a bare --name (nargs="?")
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else arg
        matches = [a for s, a in parser._option_string_actions.items() if s == name or
                   (parser.allow_abbrev and name.startswith("--") and len(name) > 2 and s.startswith(name))]
        if len({id(a) for a in matches}) != 1 or not isinstance(matches[0], argparse._StoreAction):
            continue
        seen.setdefault(matches[0], []).append(value)
        if len(seen[matches[0]]) == 2:
            values = ", then ".join(seen[matches[0]])
            return (f"{matches[0].option_strings[-1]} is given twice ({values}): which one is meant? HINT: give each "
                    "option once")
    return None


class ArgumentParser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        twice = given_twice(self, sys.argv[1:] if args is None else list(args))
        if twice:
            self.error(twice)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        hint = "" if "HINT:" in message else f". HINT: `{self.prog} --help` lists every option"
        print(f"{self.prog}: error: {message}{hint}", file=sys.stderr)
        sys.exit(1)
