"""What every ``python -m training`` command shares: flag types that name the flag's range, and how errors end.

A user's mistake (a bad value, a missing or vanished file, a full disk, a folder where a file should be) ends in one
line on stderr naming the input and the fix, exit code 2, no traceback. Anything else is a bug: exit code 1, the
traceback written to a log file whose path is printed. Imports nothing heavy: it runs before the command's modules.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from .atomic import write_text_atomic

USER_ERROR = 2
INTERNAL_ERROR = 1
INTERRUPTED = 130

#: errno -> the fix, for the OS errors a user (or the machine's state) causes, not the code.
OS_ERROR_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up: free some space or choose a folder on another disk",
    errno.ENOENT: "it does not exist (moved or deleted?): check the path",
    errno.EACCES: "permission denied: choose a path you may write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a path you may write, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a folder on a writable disk",
    errno.ENOTDIR: "a part of this path is a file, not a folder: choose another path",
    errno.EISDIR: "this is a folder where a file was expected: give the file's path",
    errno.EEXIST: "something that is not a folder is already there: choose another path or move it away",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.EIO: "the disk reported an input/output error: check the disk, or use another one",
}

#: the errno an OSError subclass stands for when it was raised with a message only (``FileNotFoundError("...")``)
_ERRNO_OF_CLASS = {
    FileNotFoundError: errno.ENOENT,
    FileExistsError: errno.EEXIST,
    IsADirectoryError: errno.EISDIR,
    NotADirectoryError: errno.ENOTDIR,
    PermissionError: errno.EACCES,
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): the flag, what is wrong, and where the help is."""

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in low..high (high None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {_range(low, high)}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float | None = None, *, low_open: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite number above ``low`` (or from ``low`` with low_open=False), below ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above = value > low if low_open else value >= low
        if not math.isfinite(value) or not above or (high is not None and value >= high):
            bound = f"{'above' if low_open else 'at least'} {low:g}" + (f" and below {high:g}" if high else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a finite number {bound}")
        return value

    parse.__name__ = "number"
    return parse


def pixels(text: str) -> int:
    """An argparse type: an image side in px, a positive multiple of 16 (the model's patch grid)."""
    try:
        value = int_in(16, 16384)(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (a multiple of 16 px)") from None
    if value % 16:
        lower, upper = value // 16 * 16, value // 16 * 16 + 16
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 16: give {lower or 16} or {upper}")
    return value


def _range(low: int, high: int | None) -> str:
    return f"{low}..{high}" if high is not None else f"an integer >= {low}"


# ---------------------------------------------------------------------------- how a command ends


def run_command(command: str, func: Callable[[], int | None], argv: list[str]) -> int:
    """Run one command's function and turn what it raises into a message and an exit code."""
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except ValueError as error:  # the package's convention for a bad input, with a message that names it
        return user_error(command, str(error))
    except OSError as error:
        if _errno(error) in OS_ERROR_FIXES:
            return user_error(command, describe_os_error(error))
        return internal_error(command, error, argv)
    except Exception as error:
        return internal_error(command, error, argv)


def user_error(command: str, message: str) -> int:
    print(f"error ({command}): {message}", file=sys.stderr)
    return USER_ERROR


def describe_os_error(error: OSError) -> str:
    """'<path>: <what the OS said>; <the fix>' (or '<the message>; <the fix>' for an OSError raised with a message)."""
    fix = OS_ERROR_FIXES.get(_errno(error), "check the path")
    names = [os.fspath(n) for n in (error.filename, error.filename2) if n is not None]
    if not names or not error.strerror:
        return f"{error}; {fix}"
    return f"{' -> '.join(str(n) for n in names)}: {error.strerror}; {fix}"


def _errno(error: OSError) -> int | None:
    if error.errno is not None:
        return error.errno
    return next((number for kind, number in _ERRNO_OF_CLASS.items() if isinstance(error, kind)), None)


def internal_error(command: str, error: BaseException, argv: list[str]) -> int:
    """A bug: the traceback goes to a log file (stderr if even that cannot be written), its path to stderr."""
    text = "".join(traceback.format_exception(error))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(tempfile.gettempdir()) / "whetstone-errors" / f"{command}-{stamp}-{os.getpid()}.log"
    try:
        write_text_atomic(path, f"python -m training {' '.join(argv)}\n\n{text}")
    except OSError as log_error:
        print(text, file=sys.stderr)
        print(f"internal error ({command}): {type(error).__name__}: {error} (no log: {log_error})", file=sys.stderr)
        return INTERNAL_ERROR
    print(
        f"internal error ({command}): {type(error).__name__}: {error}\n"
        f"  the traceback is in {path}; please report it with that file",
        file=sys.stderr,
    )
    return INTERNAL_ERROR
