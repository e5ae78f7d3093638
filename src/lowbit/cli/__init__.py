"""The ``lowbit`` command line: one module per command; each parses its options, calls the
API (``lowbit.jobs``, ``lowbit.api``) and displays.

``run`` is the one error boundary: every failure ends in one line on stderr, ``error: ...``
naming the thing and the cause, never a traceback (``lowbit --debug ...`` or
``LOWBIT_DEBUG=1`` prints it first). Exit codes (``EXIT``): 0 success; 2 a failure a user can
cause or meet (bad input or options, a damaged file, a full disk, a missing permission); 1 an
internal error (a bug: please report it); 130 interrupted (Ctrl-C)."""

from __future__ import annotations

import os
import sys
import traceback

import click

from lowbit.errors import LowbitError

EXIT = {"ok": 0, "internal": 1, "error": 2, "interrupted": 130}
ARGS: list[str] = []  # the command line being run (``lowbit.cli.launch`` runs it again)


@click.group()
@click.version_option(package_name="lowbit")
@click.option("--debug", is_flag=True,
              help="on an error, print the traceback before the one-line message (also "
                   "LOWBIT_DEBUG=1)")
def cli(debug: bool) -> None:
    """Post-training quantization of causal language models."""


def _register() -> None:
    from lowbit.cli import (
        analyze,
        calc,
        compare,
        demo,
        eval,
        export,
        generate,
        imatrix,
        info,
        inspect,
        quantize,
    )

    for mod in (quantize, eval, info, demo, export, imatrix, inspect, analyze, compare, generate,
                calc):
        cli.add_command(mod.command)
    cli.add_command(generate.chat_command)


_register()


def debug_requested(args: list[str]) -> bool:
    """``--debug`` before the command name, or LOWBIT_DEBUG set (not 0)."""
    if os.environ.get("LOWBIT_DEBUG", "0") not in ("", "0"):
        return True
    for a in args:
        if not a.startswith("-"):
            return False
        if a == "--debug":
            return True
    return False


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_failure(e: BaseException) -> tuple[str, int]:
    """The one-line message and exit code of a failure; the exception's notes (what was kept,
    how to go on) end the line."""
    msg, code = _describe(e)
    notes: list[str] = []
    cause: BaseException | None = e
    while cause is not None:  # click turns Ctrl-C into its own Abort, caused by the original
        notes += getattr(cause, "__notes__", [])
        cause = cause.__cause__ or cause.__context__
    return (f"{msg} ({one_line('; '.join(notes))})" if notes else msg), code


def _describe(e: BaseException) -> tuple[str, int]:
    if isinstance(e, LowbitError):
        return one_line(e), EXIT["error"]
    if isinstance(e, click.UsageError):
        where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        return one_line(e.format_message()) + where, e.exit_code
    if isinstance(e, click.ClickException):
        return one_line(e.format_message()), e.exit_code
    if isinstance(e, (KeyboardInterrupt, click.exceptions.Abort)):
        return "interrupted", EXIT["interrupted"]
    if isinstance(e, OSError):
        what = f"{e.filename}: " if e.filename else ""
        return one_line(f"{what}{e.strerror or e}"), EXIT["error"]
    if isinstance(e, MemoryError):
        return "out of memory", EXIT["error"]
    return (one_line(f"internal error: {type(e).__name__}: {e}") +
            " (run with --debug for the traceback, and please report it)", EXIT["internal"])


def run(args: list[str]) -> int:
    """Run one command line; the exit code (``EXIT``)."""
    global ARGS
    ARGS = list(args)
    try:
        code = cli.main(args=args, prog_name="lowbit", standalone_mode=False)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the one boundary
        msg, code = describe_failure(e)
        if debug_requested(args):
            traceback.print_exception(e, file=sys.stderr)
        click.echo(f"error: {msg}", err=True)
        return code
    return code if isinstance(code, int) else EXIT["ok"]


def main() -> None:
    sys.exit(run(sys.argv[1:]))
