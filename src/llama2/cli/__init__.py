"""The `llama2` command line: `main` reads like a table of contents of the subcommands.

Each subcommand lives in its own module of this package with `register(subparsers)`, which adds its
parser and sets `func(args, io) -> int`. Heavy dependencies are imported inside `func`.
"""

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from ..errors import Llama2Error, UsageError

# Subcommand modules, in the order `llama2 --help` lists them.
COMMANDS = ("run", "tokenize", "export", "tokenizer", "data", "train", "finetune", "eval", "serve", "bench")


@dataclass
class IO:
    """Where a command reads and writes: injectable so tests can run the CLI in-process."""
    stdout: object  # binary stream
    stderr: object  # text stream
    stdin: object  # text stream

    def out(self, data: bytes):
        self.stdout.write(data)
        self.stdout.flush()

    def err(self, text: str):
        self.stderr.write(text)
        self.stderr.flush()


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llama2", description="Train and run Llama 2 models from Python.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def check_utf8(argv):
    """Python decodes a non-UTF-8 argument with surrogateescape; refuse it here, in one line,
    rather than fail with a traceback wherever it is first encoded (a prompt, a file name)."""
    for i, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(arg).decode("utf-8", "backslashreplace")
            raise UsageError(f"argument {i} ('{shown}') is not valid UTF-8 text") from None


def main(argv=None, stdout=None, stderr=None, stdin=None) -> int:
    """Entry point of `llama2` and `python -m llama2`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    io = IO(stdout if stdout is not None else sys.stdout.buffer,
            stderr if stderr is not None else sys.stderr,
            stdin if stdin is not None else sys.stdin)
    try:
        check_utf8(argv)
        parser = build_parser()
        if not argv:
            parser.print_help(io.stderr)
            return 2
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(io.stderr)
            return 2
        return args.func(args, io)
    except UsageError as e:
        io.err(f"llama2: error: {e}\n")
        return 2
    except Llama2Error as e:
        io.err(f"llama2: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        io.err("\n")
        return 130
    except BrokenPipeError:
        return 0
