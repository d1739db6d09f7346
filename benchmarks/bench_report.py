"""What every benchmark's JSON starts with (the command and the machine) and how it is written."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

from conure_dist import provenance


def environment(script: str, argv: list[str] | None, device_arg: str) -> dict[str, Any]:
    """The command that reproduces the run (``argv``: the arguments given to ``main``, else the
    process's), the device (``--device``) and the software and threads it ran with."""
    return {
        "command": "python " + shlex.join([script, *(sys.argv[1:] if argv is None else argv)]),
        **provenance.environment(device_arg),
        "device": device_arg,
    }


def emit(report: dict[str, Any], path: str | None) -> None:
    """Print the report as JSON and, with ``path``, write it there too."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
