"""``kdp`` and ``python -m pipelines``: the command line of :mod:`pipelines.cli`.

SIGINT during the start-up imports (kfp, torch) also exits 130 with one line.
"""

import sys

from kd_lib.errors import quiet_interrupt


def main() -> int:
    with quiet_interrupt("kdp"):
        from pipelines.cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
