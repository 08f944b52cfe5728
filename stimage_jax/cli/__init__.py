"""``stimage`` command line: one module per subcommand, each parsing its arguments and
calling the library; shared options live in :mod:`stimage_jax.cli.common`.

Bad input raises :class:`StimageError`; it is printed as one ``stimage: error:`` line and
the exit status is 2 (argparse's own errors say the same and also exit 2). Outputs are
written atomically and never overwrite an existing file without ``--overwrite``.
"""

from __future__ import annotations

import sys

from export.runtime.options import OneLineParser, quiet_logs, run_command
from stimage_jax.cli import (benchmark, cells, clinical, cohort, evaluate, explain, export_dataset, export_onnx, latent,
                             predict, quickstart, read, segment_nuclei, serve, train, view)
from stimage_jax.cli.common import common_parent

__all__ = ["main", "build_parser", "COMMANDS"]

# Subcommands in the order `stimage --help` lists them; each module has add_parser(sub, parents).
COMMANDS = (read, train, predict, export_onnx, export_dataset, evaluate, explain, latent, segment_nuclei, benchmark, cells,
            quickstart, serve, cohort, clinical, view)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="stimage", description="Spatial gene expression from H&E with calibrated uncertainty.")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    parents = (common_parent(),)
    for module in COMMANDS:
        module.add_parser(sub, parents)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed its one line (or --help); hand back the status
        return e.code if isinstance(e.code, int) else 0
    quiet_logs(args.quiet)
    return run_command(args.func, args, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
