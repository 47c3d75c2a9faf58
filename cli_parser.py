"""The tools' command-line parser: argparse, except that a bad command line is one line and exit status 1.

argparse's own habit is its whole usage text, then `prog: error: ...`, and exit status 2. Every tool here (sample.py,
export.py, evals/hellaswag.py, data/*.py, records/curves.py) answers bad input the way train_gpt.py does instead:
`prog: error: <what is wrong>. HINT: <prog> --help lists every option`, exit status 1. (records/compare.py and
records/curves.py use compare.py's copy of these lines, so that compare.py stays one file that reads anyone's logs;
their usage errors exit 2, since 1 there means that a claim does not hold.)
"""

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"{self.prog}: error: {message}. HINT: `{self.prog} --help` lists every option", file=sys.stderr)
        sys.exit(1)
