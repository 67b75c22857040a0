"""One-line reports of a bad `--config` file or `--config.*` override, for the command line.

ml_collections raises plain Python errors from loading a config file and applying overrides
(some wrapped in absl's flag errors, some carrying a traceback as text), which would reach the
user as a traceback through absl's and ml_collections' internals.
"""

import os
import re
import traceback
import types

from absl import flags

_NOT_AVAILABLE = "Configuration is not available"  # ml_collections' stand-in for a failed load
_TRACEBACK_TEXT = "Error whilst parsing config file"  # its TypeError/ValueError with a traceback


def _arguments(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
    """The command line's arguments, flag files read."""
    try:
        return flag_values.read_flags_from_files(argv[1:], force_gnu=False)
    except flags.Error:
        return argv[1:]


def config_argument(argv: list[str], flag_values: flags.FlagValues) -> str | None:
    """The value of --config in `argv` (flag files read), or None."""
    args = _arguments(argv, flag_values)
    for index, arg in enumerate(args):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and index + 1 < len(args):
            return args[index + 1]
    return None


def wrapped_error(error: Exception) -> Exception | None:
    """The config error inside an absl flag error, if it holds one."""
    if isinstance(error, flags.Error):
        context = error.__context__
        return context if context is not None and _TRACEBACK_TEXT in str(context) else None
    return error


def describe(argv: list[str], flag_values: flags.FlagValues, error: Exception) -> str:
    """What is wrong, naming the file and line or the override."""
    path, args = config_argument(argv, flag_values), _arguments(argv, flag_values)
    if path is None:
        return f"--config: {error}"
    file = os.path.abspath(path.split(":", 1)[0])
    if not os.path.isfile(file):
        return f"--config={path}: no such file"
    if str(error).startswith(_NOT_AVAILABLE) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, SyntaxError):
        return f"--config={path}: {error.msg} at {error.filename}:{error.lineno}"
    module = getattr(error, "obj", None)
    if (
        isinstance(error, AttributeError)
        and error.name == "get_config"
        and isinstance(module, types.ModuleType)
        and os.path.abspath(getattr(module, "__file__", "") or "") == file
    ):
        return f"--config={path}: the file defines no get_config()"
    text = str(error)
    if isinstance(error, AttributeError) and isinstance(error.__context__, KeyError):
        # A ConfigDict field that does not exist: the KeyError's own text, on one line.
        text = " ".join(str(error.__context__.args[0]).split("\n"))
        overrides = [arg.split("=", 1)[0] for arg in args if arg.startswith("--config.")]
        for override in overrides:
            field = next((part for part in override.split(".")[1:] if f"'{part}'" in text), None)
            if field:
                suggestion = re.search(r'Did you mean "([^"]+)"', text)
                hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
                return f"{override}: the config has no field {field!r}{hint}"
    if _TRACEBACK_TEXT in text:
        frames = re.findall(r'File "([^"]+)", line (\d+)', text)
        text = text.strip().splitlines()[-1]
    else:
        frames = [(f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
        text = f"{type(error).__name__}: {text}"
    # The innermost frame of the user's code, not of ml_collections or absl.
    own = [f"{name}:{line}" for name, line in frames if _is_user_file(name)]
    return f"--config={path}: {text}" + (f" (at {own[-1]})" if own else "")


def _is_user_file(filename: str) -> bool:
    """Not Python's, an installed package's or pan_jax's own (the flag parsing)."""
    path = os.path.abspath(filename)
    return not (
        filename.startswith("<")
        or f"{os.sep}site-packages{os.sep}" in path
        or path.startswith(os.path.dirname(os.__file__) + os.sep)
        or path.startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep)
    )
