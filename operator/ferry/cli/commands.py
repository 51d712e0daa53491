"""Every click command of the `ferry` program, registered on the group in main.py."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []


def _add(module: str, *names: str) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # a component not installed in this build: say so, do not crash
        if exc.name and not exc.name.startswith("ferry"):
            raise
        return
    for name in names:
        cmd = getattr(mod, name, None)
        if cmd is not None:
            COMMANDS.append(cmd)


_add("ferry.cli.server", "operator", "metadata", "dev")
_add("ferry.cli.agent_cmd", "agent")
_add("ferry.cli.user", "migrate", "watch", "cancel", "drain", "uncordon", "status", "explain")
