"""Option shapes the commands share, so that each command's declarations read as one line an option."""

from __future__ import annotations

import typing as t

import click

__all__ = ('repeated', 'shown')

Decorator = t.Callable[[t.Callable[..., t.Any]], t.Callable[..., t.Any]]


def shown(flag: str, kind: t.Any, default: t.Any, text: str) -> Decorator:
    """An option with a default, shown in the help."""
    return click.option(flag, type=kind, default=default, show_default=True, help=text)


def repeated(flag: str, name: str, metavar: str, text: str) -> Decorator:
    """An option that may be given several times, collected as a tuple in argument ``name``."""
    return click.option(flag, name, multiple=True, metavar=metavar, help=text)
