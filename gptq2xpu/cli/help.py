"""The help pages, written by gptq2xpu itself from the commands' parameters.

typer's own help output changes between releases (type placeholders such as ``<bool>`` and
``<str>``, argument names in braces, rich panels that keep a docstring's line breaks), so every
command and the app use the classes below: they render usage, the wrapped description, arguments
and options (with each value's name, choices, default, bounds and environment variable) and the
examples, from the plain attributes of click parameters.  The help is therefore the same under
every typer release the package accepts, and ``tests/test_cli_ux.py`` checks it.
"""

from __future__ import annotations

import inspect
from enum import Enum

from typer.core import TyperCommand, TyperGroup


def _metavar(param) -> str:
    return param.metavar or param.name.upper()


def _is_flag(param) -> bool:
    return bool(getattr(param, "is_flag", False))


def _bounds(param) -> str | None:
    low = getattr(param, "min", None)
    high = getattr(param, "max", None)
    if low is None and high is None:  # older typer keeps them on click's IntRange type
        kind = getattr(param, "type", None)
        low, high = getattr(kind, "min", None), getattr(kind, "max", None)
    if low is None and high is None:
        return None
    if high is None:
        return f"x>={low}"
    if low is None:
        return f"x<={high}"
    return f"{low}<=x<={high}"


def _default(param) -> str | None:
    value = param.default
    if _is_flag(param) and not getattr(param, "secondary_opts", None):
        return None  # a plain flag is off unless given
    if callable(value) or value is None or getattr(param, "show_default", True) is False:
        return None
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):  # --numeric/--no-numeric
        return (param.opts if value else param.secondary_opts)[0].lstrip("-")
    return str(value)


def _option_row(param) -> tuple[str, str]:
    names = ", ".join(sorted(param.opts, key=len))
    if param.secondary_opts:
        names += " / " + ", ".join(sorted(param.secondary_opts, key=len))
    if not _is_flag(param):
        names += " " + _metavar(param)
    extra = []
    envvar = getattr(param, "envvar", None)
    if envvar and getattr(param, "show_envvar", False):
        extra.append(f"env var: {envvar}")
    default = _default(param)
    if default is not None:
        extra.append(f"default: {default}")
    bounds = _bounds(param)
    if bounds:
        extra.append(bounds)
    text = " ".join((param.help or "").split())
    return names, text + (f"  [{'; '.join(extra)}]" if extra else "")


def _write_help(command, ctx, formatter, usage_tail: list[str]) -> None:
    arguments = [p for p in command.get_params(ctx) if p.param_type_name == "argument"]
    options = [p for p in command.get_params(ctx) if p.param_type_name == "option" and not getattr(p, "hidden", False)]
    formatter.write_usage(ctx.command_path, " ".join(["[OPTIONS]", *map(_metavar, arguments), *usage_tail]))
    if command.help:
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(inspect.cleandoc(command.help))
    if arguments:
        with formatter.section("Arguments"):
            formatter.write_dl([(_metavar(p), " ".join((getattr(p, "help", None) or "").split())) for p in arguments])
    with formatter.section("Options"):
        formatter.write_dl([_option_row(p) for p in options])
    if isinstance(command, TyperGroup):
        rows = [(name, command.get_command(ctx, name).short_help or "") for name in command.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)
    if command.epilog:
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(inspect.cleandoc(command.epilog))


class Command(TyperCommand):
    """A command whose help is written by :func:`_write_help`."""

    def format_help(self, ctx, formatter) -> None:
        _write_help(self, ctx, formatter, [])


class Group(TyperGroup):
    """The app: its help is written by :func:`_write_help`, with the commands listed."""

    def format_help(self, ctx, formatter) -> None:
        _write_help(self, ctx, formatter, ["COMMAND [ARGS]..."])

    def list_commands(self, _ctx) -> list[str]:
        """In the order they were registered (older typer releases sort them by name)."""
        return list(self.commands)
