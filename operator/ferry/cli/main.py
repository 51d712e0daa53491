"""The `ferry` command line (also `kubectl ferry`).

Server programs: ``operator``, ``agent``, ``metadata``. User commands: ``migrate``,
``cancel``, ``drain``, ``uncordon``, ``status``, ``explain``. Developer commands: ``dev``.
Errors are one clear line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from ferry import __version__, logs


class FerryGroup(click.Group):
    """Turns every ferry error into one line on stderr."""

    def invoke(self, ctx: click.Context):  # noqa: D401
        from ferry.settings import SettingsError
        from ferry.storage import StorageError

        try:
            return super().invoke(ctx)
        except (StorageError, SettingsError, ValueError, OSError) as exc:
            click.echo(f"ferry: error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=FerryGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ferry")
@click.option("--kubeconfig", envvar="KUBECONFIG", default=None, help="Kubeconfig file (default: $KUBECONFIG or in-cluster).")
@click.option("-n", "--namespace", default=None, help="Namespace of droplets and migrations (default: the kubeconfig's or 'default').")
@click.option("-v", "--verbose", count=True, help="More logging.")
@click.pass_context
def cli(ctx: click.Context, kubeconfig: str | None, namespace: str | None, verbose: int) -> None:
    """ferry live-migrates droplets (virtual machines) between hosts."""
    logs.configure(logging.WARNING - 10 * verbose)
    ctx.obj = {"kubeconfig": kubeconfig, "namespace": namespace}


def _register() -> None:
    from ferry.cli import commands

    for cmd in commands.COMMANDS:
        cli.add_command(cmd)


def main() -> None:
    _register()
    # `kubectl ferry` passes no program name of its own; keep click's messages right either way.
    prog = "kubectl ferry" if os.path.basename(sys.argv[0]).startswith("kubectl-") else "ferry"
    cli.main(prog_name=prog)


if __name__ == "__main__":
    main()
