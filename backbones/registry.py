"""A registry of components chosen by name (models, fusion strategies, MIL aggregators), like
timm's create_model: @registry.register(name) on a builder, registry.create(name, *args)."""
from __future__ import annotations

from typing import Callable

from config import ConfigError
from utils.config_file import closest


class Registry:
    def __init__(self, kind: str, flag: str):
        self.kind, self.flag = kind, flag  # what it holds, and the option that names one
        self._builders: dict[str, Callable] = {}

    def register(self, name: str):
        def decorator(builder: Callable) -> Callable:
            self._builders[name] = builder
            return builder
        return decorator

    def names(self) -> list[str]:
        return sorted(self._builders)

    def create(self, name: str, *args):
        """The component built by its builder; an unknown name is a one-line ConfigError."""
        if name not in self._builders:
            raise ConfigError(f"[CFG004] {self.flag}: unknown {self.kind} '{name}'{closest(name, self._builders)}; "
                              f"valid: {', '.join(self.names())}")
        return self._builders[name](*args)
