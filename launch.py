"""torchrun, ending on our line. `python launch.py [torchrun's options] train_gpt.py [settings]` launches exactly as
`torchrun` does (the same options, the same environment for every rank: it calls torchrun's own parser and
launcher), with two differences for when a run stops early:
- torchrun reports a failed rank with a traceback and a table of its own, after the rank's one-line reason; here the
  rank's `error: ...` line stays the last word but one, then one line of ours says which rank stopped and how;
- the exit status is the failing rank's (1 for a refused or failed run), not torchrun's.
run.sh launches through it. Examples:
    python launch.py --standalone --nproc_per_node=8 train_gpt.py
    python launch.py --standalone --nproc_per_node=2 train_gpt.py --preset=smoke --device=cpu
"""

import logging
import signal
import sys


def launch(argv: list[str]) -> int:
    """Launch as torchrun would with argv; return the exit status to end with."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()  # torchrun's own options; a bad one is one line, as in every tool here

    def error(message: str):
        print(f"launch.py: error: {message}. HINT: `torchrun --help` lists torchrun's options; then the script and "
              "its settings", file=sys.stderr)
        sys.exit(1)

    parser.error = error
    args = parser.parse_args(argv)

    # torchrun's agent logs each failure (and a hint about OMP_NUM_THREADS at every start) as warnings and errors;
    # the rank has said why it stopped, and the one line below says the rest
    for name in logging.root.manager.loggerDict:  # torch's elastic loggers each set a level of their own
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ValueError as e:  # torchrun's own check of its options, e.g. --nproc_per_node=abc
        error(str(e).strip().rstrip("."))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        print(f"launch: rank {rank} stopped ({how}); the reason is its error line above and the last line "
              "of the run's log", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
