"""Every user mistake is an XaiError with a one-line message and an exit code.

Exit codes (documented in the README and `xai --help`):
    0  all done
    1  done, but some images failed (see OUT/errors.csv)
    2  usage or config error
    3  output folder locked by another run
    4  internal or I/O error (disk full, unwritable output, a bug): one line, XAI_DEBUG=1 for a traceback
    130 interrupted
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130


class XaiError(Exception):
    """Base class: a problem the user can fix; printed as one line, never a traceback."""

    exit_code = EXIT_USAGE


class ConfigError(XaiError):
    """The config file or a flag is wrong (unknown key, wrong type, bad value)."""


class InputError(XaiError):
    """The input (folder, glob, list file) names nothing usable."""


class ModelError(XaiError):
    """The model cannot be built or its weights cannot be loaded."""


class MethodError(XaiError):
    """A method cannot run on this model (unknown method, bad parameter, bad layer)."""


class LockedError(XaiError):
    """Another run holds the output folder."""

    exit_code = EXIT_LOCKED


class StateError(XaiError):
    """A state file in the output folder is damaged (hand edit, full disk, bad sync): the message
    names the file and the fix (`xai explain --repair`)."""
