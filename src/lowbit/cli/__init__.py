"""The ``lowbit`` command line: one module per command; each parses its options, calls the
API (``lowbit.jobs``, ``lowbit.api``) and displays. Errors a user can cause end in one line
(``error: ...``) and exit code 2."""

from __future__ import annotations

import sys

import click

from lowbit.errors import LowbitError


@click.group()
@click.version_option(package_name="lowbit")
def cli() -> None:
    """Post-training quantization of causal language models."""


def _register() -> None:
    from lowbit.cli import demo, eval, export, imatrix, info, inspect, quantize

    for mod in (quantize, eval, info, demo, export, imatrix, inspect):
        cli.add_command(mod.command)


_register()


def run(args: list[str]) -> int:
    """Run one command line; the exit code (0, 2 for a lowbit error, 130 when aborted)."""
    try:
        cli.main(args=args, prog_name="lowbit", standalone_mode=False)
    except LowbitError as e:  # one line, whatever a library put into the message
        click.echo(f"error: {' '.join(str(e).split())}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))
