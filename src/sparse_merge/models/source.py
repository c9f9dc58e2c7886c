"""Where a run's models come from: a base model and two or more parents, as paths or hub ids."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from sparse_merge.errors import ConfigError


@runtime_checkable
class ModelSource(Protocol):
    """Gives the locations (local dirs or hub ids) of the base model and the parents."""

    name: str

    def base(self) -> str | Path:
        """The base (pre-trained) model."""
        ...

    def parents(self) -> dict[str, str | Path]:
        """The parents to merge, by name (two or more)."""
        ...

    def tokenizer(self) -> str | Path:
        """Where the tokenizer is saved."""
        ...


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_location(key: str, value: str | Path | None, weights: bool = True) -> None:
    """An error, before anything loads, unless ``value`` is an existing local folder (holding
    ``.safetensors`` files, with ``weights``) or file, or reads as a hub id (``name`` or
    ``namespace/name``): a path that does not exist used to be taken for a hub id, and a folder
    without weights refused, after the first model had loaded."""
    if value is None:
        return
    path = Path(str(value)).expanduser()
    if path.is_dir() and weights and not any(path.glob("*.safetensors")):
        raise ConfigError(key, str(value), "a folder holding the model's .safetensors files")
    if path.exists():
        return
    if not HUB_ID.fullmatch(str(value)):
        raise ConfigError(key, str(value), "an existing local folder, or a hub id (namespace/name)")


class PretrainedModels:
    """Models given by local path or hub id (``model=hf model.parents={math: ..., code: ...}``)."""

    def __init__(
        self,
        name: str,
        base: str | None = None,
        parents: Mapping[str, str] | None = None,
        tokenizer: str | None = None,
    ) -> None:
        self.name = name
        self._base = base
        self._parents = dict(parents or {})
        self._tokenizer = tokenizer or base or next(iter(self._parents.values()), None)
        if self._tokenizer is None:
            raise ConfigError("base", base, "a local path or hub id (or at least one parent)")

    def check(self) -> None:
        """Refuse, before any model loads, a base or parent that is neither an existing local
        path nor a hub id, and a parent folder without weights (``check_location``)."""
        check_location("model.base", self._base, weights=False)
        for name, value in self._parents.items():
            check_location(f"model.parents.{name}", value)

    def base(self) -> str | Path:
        """The base model."""
        if self._base is None:
            raise ConfigError("model.base", None, "a local path or hub id for the base model")
        return self._base

    def parents(self) -> dict[str, str | Path]:
        """The parents by name."""
        if len(self._parents) < 2:
            raise ConfigError("model.parents", self._parents, "two or more name: path entries")
        return dict(self._parents)

    def tokenizer(self) -> str | Path:
        """Where the tokenizer lives (the base, else the first parent)."""
        return self._tokenizer
