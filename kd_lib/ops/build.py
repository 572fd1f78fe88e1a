"""``python -m kd_lib.ops.build``: compile the CUDA extension of :mod:`kd_lib.ops` and print where it is.

Run where the CUDA toolkit is (the image's build stage); set
``KD_LIB_OPS_DIR`` to choose the folder and ``TORCH_CUDA_ARCH_LIST`` the
GPUs (default: the visible ones, else 8.0 and 9.0 with PTX). Exits 1 with the
reason when the extension cannot be built.
"""

from __future__ import annotations

import argparse
import sys

from kd_lib.ops import extension


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_lib.ops.build", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)
    try:
        path = extension.build(verbose=args.verbose)
    except Exception as error:
        print(f"kd_lib.ops.build: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
