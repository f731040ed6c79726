"""The ``[tool.hub-backdoor]`` table of a ``pyproject.toml`` (or any TOML file): the audit options of
``hub-backdoor audit`` / ``purify`` and of the pre-commit hook, and, in its ``purify`` sub-table, the
purification options of ``hub-backdoor purify``.

Keys are the command-line flags without ``--`` (``_`` and ``-`` are the same), with the values the
flags take (``max-accuracy-drop`` in points). Both tables are built from
:class:`~hub_backdoor.options.AuditOptions` and :class:`~hub_backdoor.options.PurifyOptions`, so a
new option is a new key.

.. code-block:: toml

    [tool.hub-backdoor]
    dataset = "org/reference-data"
    max-samples = 500

    [tool.hub-backdoor.purify]
    epochs = 20
    max-accuracy-drop = 2
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from .errors import HubBackdoorError
from .options import AuditOptions, PurifyOptions, flag, positive_int

__all__ = ["CONFIG_KEYS", "PURIFY_KEYS", "command_defaults", "read_config"]


def _config_type(f: Any) -> type:
    kind = f.metadata["type"]
    return int if kind is positive_int else kind


#: Keys of ``[tool.hub-backdoor]``: name -> (audit flag or None, type). Every
#: :class:`~hub_backdoor.options.AuditOptions` field is one, by its flag's name.
CONFIG_KEYS: dict[str, tuple[str | None, type]] = {
    "dataset": ("--dataset", str),
    "split": ("--split", str),
    **{f.name.replace("_", "-"): (flag(f.name), _config_type(f)) for f in dataclasses.fields(AuditOptions)},
    "allow-pickle": ("--allow-pickle", bool),
    "trust-remote-code": ("--trust-remote-code", bool),
    "models": (None, list),
    "purify": (None, dict),
}

#: Keys of ``[tool.hub-backdoor.purify]``: every :class:`~hub_backdoor.options.PurifyOptions` field,
#: by its flag's name -> type.
PURIFY_KEYS: dict[str, type] = {
    f.name.replace("_", "-"): _config_type(f) for f in dataclasses.fields(PurifyOptions)
}
#: The values a purify key may take where its flag has choices (``train``), as on the command line.
_PURIFY_CHOICES: dict[str, tuple[str, ...]] = {
    f.name.replace("_", "-"): f.metadata["choices"] for f in dataclasses.fields(PurifyOptions)
    if f.metadata["choices"]
}


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise HubBackdoorError(
                f"reading {path} needs Python >= 3.11 or the tomli package (pip install tomli)"
            ) from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise HubBackdoorError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise HubBackdoorError(f"{path} is not valid TOML ({e})") from None


def _checked(value: Any, kind: type, where: str) -> Any:
    """``value`` as ``kind`` (an int is a float too), or a :class:`HubBackdoorError` naming ``where``."""
    if kind is bool:
        if not isinstance(value, bool):
            raise HubBackdoorError(f"{where} must be true or false")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HubBackdoorError(f"{where} must be a number")
        value = float(value)
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HubBackdoorError(f"{where} must be an integer")
    elif not isinstance(value, str):
        raise HubBackdoorError(f"{where} must be a string")
    return value


def _purify_table(table: Any, file: Path) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise HubBackdoorError(f"{file}: [tool.hub-backdoor.purify] must be a table")
    out: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-")
        if key not in PURIFY_KEYS:
            known = ", ".join(PURIFY_KEYS)
            where = "[tool.hub-backdoor.purify]"
            raise HubBackdoorError(f"{file}: unknown key {raw_key!r} in {where}; known: {known}")
        out[key] = _checked(value, PURIFY_KEYS[key], f"{file}: {raw_key!r}")
        if key in _PURIFY_CHOICES and value not in _PURIFY_CHOICES[key]:
            raise HubBackdoorError(f"{file}: {raw_key!r} must be one of {', '.join(_PURIFY_CHOICES[key])}")
    return out


def read_config(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The ``[tool.hub-backdoor]`` table of ``path`` (default: ``./pyproject.toml`` when it exists).

    Keys are those of :data:`CONFIG_KEYS` (``_`` and ``-`` are the same); values are checked. Relative
    paths (``dataset`` when it names an existing folder, ``models``) are resolved against the file's
    folder. The ``purify`` sub-table, when present, is ``{"purify": {key: value}}`` with the keys of
    :data:`PURIFY_KEYS`. Returns ``{}`` when there is no file or no such table.
    """
    explicit = path is not None
    file = Path(path) if path is not None else Path("pyproject.toml")
    if not file.is_file():
        if explicit:
            raise HubBackdoorError(f"config file {file} does not exist")
        return {}
    table = _load_toml(file).get("tool", {}).get("hub-backdoor")
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise HubBackdoorError(f"{file}: [tool.hub-backdoor] must be a table")
    out: dict[str, Any] = {}
    base = file.resolve().parent
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-")
        if key == "model":
            key = "models"
        if key not in CONFIG_KEYS:
            raise HubBackdoorError(
                f"{file}: unknown key {raw_key!r} in [tool.hub-backdoor]; known: {', '.join(CONFIG_KEYS)}"
            )
        if key == "purify":
            out[key] = _purify_table(value, file)
            continue
        if key == "models":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise HubBackdoorError(f"{file}: 'models' must be a folder or a list of folders")
            out[key] = [str(base / v) for v in value]
            continue
        value = _checked(value, CONFIG_KEYS[key][1], f"{file}: {raw_key!r}")
        if key == "dataset" and (base / value).exists() and not Path(value).is_absolute():
            value = str(base / value)
        out[key] = value
    return out


def command_defaults(config: dict[str, Any], *, purify: bool) -> dict[str, Any]:
    """Argparse defaults (``dest -> value``) of ``hub-backdoor audit`` (``purify=False``) or
    ``hub-backdoor purify`` from a :func:`read_config` table: its audit keys and, for ``purify``, its
    ``purify`` sub-table. Flags given on the command line still win."""
    out = {
        key.replace("-", "_"): value for key, value in config.items()
        if CONFIG_KEYS[key][0] is not None
    }
    if purify:
        out.update({key.replace("-", "_"): value for key, value in config.get("purify", {}).items()})
    return out
