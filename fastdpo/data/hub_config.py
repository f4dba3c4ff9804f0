"""A hub dataset's configuration name (TRL's ``dataset_config``, ``datasets.load_dataset``'s ``name``), for the
loads made inside ``hub_config(name)``: the ``fastdpo`` command's, which reach the hub through several preparations
(``load_data``, ``load_stream`` and the functions that call them) that take no such argument themselves."""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path

from fastdpo.errors import ConfigError

_NAME: contextvars.ContextVar[tuple[str | None, str]] = contextvars.ContextVar(
    "fastdpo_hub_config", default=(None, "dataset_config")
)


@contextlib.contextmanager
def hub_config(name: str | None, option: str = "dataset_config"):
    """Hub datasets loaded inside are loaded with ``name`` (None: their default configuration); ``option``: where the
    user set it, as errors name it (the YAML's ``dataset_config``, a command's ``--dataset-config``)."""
    token = _NAME.set((name, option))
    try:
        yield
    finally:
        _NAME.reset(token)


def with_config(options: dict) -> dict:
    """``load_dataset``'s keyword arguments with the configuration's ``name``, where one is set."""
    name = _NAME.get()[0]
    return options if name is None else {**options, "name": name}


def refuse_config_of_local(path: Path, local: bool) -> None:
    """A ConfigError where a configuration is set and the data is a local file or folder, which has none but
    ``default`` (datasets' name for a folder's one configuration: a hub config copied beside a local mirror)."""
    name, option = _NAME.get()
    if local and name not in (None, "default"):
        raise ConfigError(f"{name!r} names a hub dataset's configuration; {path} is a local file or folder, which has "
                          "none", column=option, fix=f"remove {option}")  # fmt: skip
