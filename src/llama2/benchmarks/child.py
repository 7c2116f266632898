"""How the benchmarks start a child process: ours runs `llama2.benchmarks.engine` under this
interpreter; llama.cpp's runs peer.py as a script, under the peer's interpreter when one is given
(`--peer-python`), so that interpreter needs only numpy and llama-cpp-python.

`engine.py` (measurements) and `files.py` (llama.cpp's quantizer) both start children through here.
"""

import os
import sys
from pathlib import Path

from ..errors import Llama2Error

PEER_SCRIPT = Path(__file__).resolve().with_name("peer.py")


class ChildError(Llama2Error):
    """A benchmark child failed; the message is one line (its last line on stderr)."""


def child_command(impl, python=None):
    """The command prefix and environment of a child: ours for `impl` "ours", else llama.cpp's."""
    if impl == "ours":
        return [sys.executable, "-m", "llama2.benchmarks.engine"], dict(os.environ)
    return [python or sys.executable, str(PEER_SCRIPT)], dict(os.environ)


def last_line(p) -> str:
    """The last line a finished child (a `subprocess.CompletedProcess`) wrote on stderr."""
    lines = p.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {p.returncode}"
