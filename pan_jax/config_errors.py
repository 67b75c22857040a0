"""One-line reports of a bad `--config` file, `--config.*` override or config value.

ml_collections raises plain Python errors from loading a config file and applying overrides,
wrapped in absl's flag errors, re-raised with a traceback as text, or kept in a stand-in config
that raises on first use: they would reach the user as a traceback through absl's and
ml_collections' internals. `watch_config_flag` records which file the flag loads; `describe`
finds the error that started it all and says where it was raised in the user's files.
"""

import os
import re
import sys
import traceback
import types

from absl import flags


class ConfigError(ValueError):
    """A config value a run cannot use, named with what was expected: `python -m pan_jax.main`
    reports it in one line instead of a traceback."""


_LIBRARIES = (f"{os.sep}absl{os.sep}", f"{os.sep}ml_collections{os.sep}")
_TRACEBACK_TEXT = "Error whilst parsing config file"  # ml_collections' re-raise of get_config's
_loaded = {"path": None, "config": None}  # the --config argument being (or last) loaded


def watch_config_flag(flag_values: flags.FlagValues) -> None:
    """Wraps the `config` flag's file loading.

    It records the argument being loaded (absl parses every occurrence of the flag), puts the
    file's package parent on `sys.path` while the file loads (config files import their
    siblings, `from configs import default`, from any working directory), and refuses a
    `get_config()` that returns no ConfigDict (absl reports the ValueError in one line).
    """
    import ml_collections  # here: train imports ConfigError, and the bench runs without it

    parser = flag_values["config"].parser
    load = parser.parse

    def parse(argument: str):
        _loaded["path"], _loaded["config"] = argument, None
        folder = os.path.dirname(os.path.abspath(argument.split(":", 1)[0]))
        root = os.path.dirname(folder)
        added = os.path.isfile(os.path.join(folder, "__init__.py")) and root not in sys.path
        if added:
            sys.path.insert(0, root)
        try:
            config = load(argument)
        finally:
            if added:
                sys.path.remove(root)
        _loaded["config"] = config
        failed_to_load = hasattr(config, "_ReportError")  # ml_collections' stand-in
        if not (isinstance(config, ml_collections.ConfigDict) or failed_to_load):
            raise ValueError(
                f"get_config() returned {type(config).__name__}, expected a ConfigDict"
            )
        return config

    parser.parse = parse


def describe(error: BaseException, arguments: list[str]) -> str | None:
    """What is wrong with the config file or an override, in one line; None when the error
    did not come from either (absl's own message says it better)."""
    path = _loaded["path"]
    if path is None:
        return None
    where = f"--config={path}"
    file = path.split(":", 1)[0]
    if not os.path.exists(file):
        return f"{where}: no such file"
    if not os.path.isfile(file):
        return f"{where}: not a file"
    chain = _causes(error)
    original = chain[-1]
    if isinstance(original, SyntaxError):
        return f"{where}: {original.msg} at {original.filename}:{original.lineno}"
    module = getattr(original, "obj", None)
    if (
        isinstance(original, AttributeError)
        and original.name == "get_config"
        and isinstance(module, types.ModuleType)
        and os.path.samefile(getattr(module, "__file__", None) or os.devnull, file)
    ):
        return f"{where}: the file defines no get_config()"
    frames = [
        frame
        for link in chain
        for frame in traceback.extract_tb(link.__traceback__)
        if _is_user_file(frame.filename)
    ]
    at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    text = " ".join(line.strip() for line in str(original).splitlines() if line.strip())
    if isinstance(original, KeyError) and _raised_in_library(original):
        # A ConfigDict field that does not exist: in the file (it ran through the user's
        # frames) or in an override (it did not). The outermost KeyError says "did you mean".
        missing_key = next(link for link in chain if isinstance(link, KeyError))
        text = " ".join(str(missing_key.args[0]).split("\n")) if missing_key.args else text
        # Reading a missing field: 'name'...; adding one to a locked config: Key "name" ...
        field = re.match(r"'([^']*)'", text) or re.match(r'Key "([^"]*)" does not exist', text)
        suggestion = re.search(r'Did you mean "([^"]+)"', text)
        missing = f"the config has no field {repr(field.group(1)) if field else text}"
        missing += f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
        if frames:
            return f"{where}: {missing}{at}"
        overrides = [arg.split("=", 1)[0] for arg in arguments if arg.startswith("--config.")]
        named = [o for o in overrides if field and field.group(1) in o.split(".")[1:]]
        # Of two overrides with that field (--config.model.crop_size, --config.data.crop_size),
        # the one whose path the config lacks.
        lacking = [o for o in named if not _resolves(_loaded["config"], o.split(".")[1:])]
        return f"{(lacking or named or ['--config.*'])[-1]}: {missing}"
    loading = any(_TRACEBACK_TEXT in str(link) for link in chain)  # failed in get_config()
    if not (frames or loading):
        return None
    return f"{where}: {type(original).__name__}: {text}{at}"


def _resolves(config: object, keys: list[str]) -> bool:
    """Whether the loaded config has the field at `keys` (False where it failed to load)."""
    node = config
    for key in keys:
        try:
            node = node[key]  # type: ignore[index]
        except Exception:  # a missing key; a value that is no ConfigDict; the stand-in's error
            return False
    return True


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and the errors it wraps, outermost first: a link is followed only when absl or
    ml_collections raised the outer one (an error raised while the user's own code handled
    another is not caused by it)."""
    chain = [error]
    while _raised_in_library(chain[-1]):
        inner = chain[-1].__cause__ or chain[-1].__context__
        if inner is None or inner in chain:
            break
        chain.append(inner)
    return chain


def _raised_in_library(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and any(part in frames[-1].filename for part in _LIBRARIES)


def _is_user_file(filename: str) -> bool:
    """Not Python's, an installed package's, or pan_jax's (its flag parsing is on the stack)."""
    path = os.path.abspath(filename)
    return not (
        filename.startswith("<")
        or f"{os.sep}site-packages{os.sep}" in path
        or f"{os.sep}dist-packages{os.sep}" in path
        or path.startswith(os.path.dirname(os.__file__) + os.sep)
        or path.startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep)
    )
