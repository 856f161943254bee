"""``python -m kaedama.train MANIFEST --out DST ...``: the entry point torchrun launches.

Takes exactly the arguments of ``kaedama train`` (shared parser), so a command
line moves between a laptop, ``torchrun --nproc_per_node=N`` and a Kubeflow
TrainJob unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kaedama.commands import train as command
from kaedama.errors import KaedamaError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kaedama.train", description=command.HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    command.configure(parser)
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )
    try:
        return command.run(args)
    except KaedamaError as exc:
        print(f"kaedama train: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
