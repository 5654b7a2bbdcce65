"""Command-line flags that fall back to environment variables, then to a config dataclass's defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields


def dataclass_defaults(cls) -> dict:
    return {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cls)}


class EnvFlags:
    """`--some-name` (dest `some_name`) defaulting to $ENV_NAME, else the dataclass field's default."""

    def __init__(self, parser: argparse.ArgumentParser, config_cls):
        self.parser = parser
        self.defaults = dataclass_defaults(config_cls)

    def add(self, name: str, env_name: str, kind=str, help: str = "", flag: str | None = None) -> None:
        raw = os.environ.get(env_name)
        self.parser.add_argument(
            flag or "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=kind(raw) if raw not in (None, "") else self.defaults.get(name),
            help=f"{help} [{env_name}]",
        )

    def switch(self, name: str, env_name: str, help: str = "") -> None:
        """A boolean flag, also on when $ENV_NAME is 1."""
        self.parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            action="store_true",
            default=os.environ.get(env_name, "") == "1",
            help=f"{help} [{env_name}=1]",
        )
