#!/bin/sh
# The images' entrypoint. A command found on PATH runs as given: KFP's executor (`sh -ec ...`),
# TorchX's `torchrun ...`, `python3`, a shell. Anything else is kdp's: `docker run IMAGE stage
# teacher ...` runs `kdp stage teacher ...`, and no arguments print kdp's help.
[ $# -gt 0 ] || set -- --help
if command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec kdp "$@"
