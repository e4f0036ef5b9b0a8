"""Command lines: user errors, checked flags, one-line messages and exit codes.

Every CLI of the project behaves the same way: a mistake in the input or the flags is one line
`error: ...` and exit code 2, before any model is loaded; Ctrl-C is one line and exit code 130.
"""

import argparse
import math
import os
import sys


class UserError(Exception):
    """A mistake in the user's input or arguments; CLIs print 'error: <msg>' and exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors, so a CLI prints them like every other mistake, on
    one line: 'error: argument --lr: expected a finite number > 0, got -1 (see --help)', exit 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def _number(text: str, cast, ok, expected: str):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):  # nan and inf are refused everywhere
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


# argparse `type=` functions: the value is checked in parse_args and the message names the flag.
def positive_int(text):
    return _number(text, int, lambda x: x > 0, "an integer > 0")


def nonnegative_int(text):
    return _number(text, int, lambda x: x >= 0, "an integer >= 0")


def positive_float(text):
    return _number(text, float, lambda x: x > 0, "a finite number > 0")


def nonnegative_float(text):
    return _number(text, float, lambda x: x >= 0, "a finite number >= 0")


def fraction(text):
    return _number(text, float, lambda x: 0 <= x <= 1, "a number in [0, 1]")


def probability(text):
    return _number(text, float, lambda x: 0 < x <= 1, "a number in (0, 1]")


def print_error(error: Exception) -> int:
    """`error: ...` for a user's mistake, and the exit code 2. Under torchrun, ranks other than 0
    have a silenced stderr (ranks.start_ranks), yet a bad example may show on theirs only: they
    write to the real stderr, naming themselves."""
    rank = int(os.environ.get("RANK", 0))
    stream, prefix = (sys.stderr, "") if rank == 0 else (sys.__stderr__, f"[rank {rank}] ")
    print(f"{prefix}error: {error}", file=stream)
    return 2


def run_cli(body, *args, interrupted: str = "interrupted: nothing written") -> int:
    """body(*args) as a command: its exit code; a UserError is one line and 2, Ctrl-C one line and 130."""
    try:
        return body(*args)
    except UserError as e:
        return print_error(e)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
