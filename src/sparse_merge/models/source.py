"""Where a run's models come from: a base model and two or more parents, as paths or hub ids."""

from __future__ import annotations

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
