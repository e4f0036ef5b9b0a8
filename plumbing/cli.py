"""Command lines: user errors, checked flags, one-line messages and exit codes.

Every CLI of the project behaves the same way: a mistake in the input or the flags is one line
`error: ...` and exit code 2, before any model is loaded; a failure of the system (a full disk, a
file-size limit, a permission taken away, a lost lock) is one line and exit code 1, with what was
saved intact; Ctrl-C is one line and exit code 130.
"""

import argparse
import math
import os
import sys


class UserError(Exception):
    """A mistake in the user's input or arguments; CLIs print 'error: <msg>' and exit 2."""


class RunError(Exception):
    """The run cannot go on safely, through no mistake in its input (a full disk, a lost lock): CLIs
    print 'error: <msg>' and exit 1; what was saved before stays as it was."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors, so a CLI prints them like every other mistake, on
    one line: 'error: argument --lr: expected a finite number > 0, got -1 (see --help)', exit 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


# Every number flag stays where the float32 and int64 arithmetic done with it cannot overflow:
# an integer below 2**63 (torch's seeds and sizes), a float of magnitude within [1e-30, 1e30], or 0
# (float32 reaches 3.4e38: a histogram over ±3β, logits / temperature, exp(−φ/β) stay finite).
INT_LIMIT, FLOAT_RANGE = 2**63, (1e-30, 1e30)


def _number(text: str, cast, ok, expected: str):
    try:
        value = cast(text)
    except ValueError:  # also an integer of more digits than Python converts (4300)
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text[:40]!r}") from None
    if cast is float and not math.isfinite(value) or not ok(value):  # nan and inf are refused everywhere
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    if cast is int and abs(value) >= INT_LIMIT:
        raise argparse.ArgumentTypeError(f"expected {expected} below 2**63, got {text[:40]}")
    if cast is float and value != 0 and not FLOAT_RANGE[0] <= abs(value) <= FLOAT_RANGE[1]:
        zero = " (or 0)" if ok(0.0) else ""
        raise argparse.ArgumentTypeError(f"expected {expected} of magnitude within [1e-30, 1e30]{zero}, got {text}")
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
    """body(*args) as a command: its exit code; a UserError is one line and 2, a RunError or an
    OSError (ENOSPC, EFBIG, EACCES, ...) one line and 1, Ctrl-C one line and 130."""
    try:
        return body(*args)
    except UserError as e:
        return print_error(e)
    except (RunError, OSError) as e:
        print_error(e)
        return 1
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
