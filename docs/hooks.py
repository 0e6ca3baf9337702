"""MkDocs hook: fills the reference page from the code, so that it cannot drift from it.

A page that contains ``<!-- generated: NAME -->`` gets that marker replaced by the generated text. Names:

- ``cli``: every ``aiida-zmq`` command with its usage, help and options (from the click group);
- ``broker-config``: the broker's tunables (:class:`aiida_zmq.broker.config.BrokerConfig`, comments from its source);
- ``profile-config``: the AiiDA profile options of the ``zmq`` broker (``ZmqBroker.config_fields()``);
- ``connect``: the options of :func:`aiida_zmq.connect` (the communicator's constructor);
- ``admin``: the ADMIN operations the broker answers.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing as t

import click

MARKER = re.compile(r'<!-- generated: ([a-z-]+) -->')


def on_page_markdown(markdown: str, **_kwargs: t.Any) -> str:
    return MARKER.sub(lambda match: GENERATORS[match.group(1)](), markdown)


def _cli() -> str:
    from aiida_zmq.cli.main import main

    lines: list[str] = []

    def walk(command: click.Command, path: list[str], parent: click.Context | None) -> None:
        context = click.Context(command, info_name=path[-1], parent=parent)
        if path[1:]:
            lines.append(f'### `{" ".join(path)}`\n')
            lines.append('```\n' + command.get_help(context) + '\n```\n')
        if isinstance(command, click.Group):
            for name in sorted(command.list_commands(context)):
                sub = command.get_command(context, name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name], context)

    walk(main, ['aiida-zmq'], None)
    return '\n'.join(lines)


def _field_comments(cls: type) -> dict[str, str]:
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r'\s+(\w+): [^=]+=[^#]*#\s*(.*)', line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def _broker_config() -> str:
    from aiida_zmq.broker.config import BrokerConfig

    comments = _field_comments(BrokerConfig)
    rows = ['| field | default | meaning |', '|---|---|---|']
    for item in dataclasses.fields(BrokerConfig):
        rows.append(f'| `{item.name}` | `{item.default!r}` | {comments.get(item.name, "")} |')
    return '\n'.join(rows) + '\n'


def _profile_config() -> str:
    from aiida_zmq.aiida.broker import ZmqBroker

    rows = ['| option | default | a command-line option | meaning |', '|---|---|---|---|']
    for item in ZmqBroker.config_fields().values():
        exposed = 'yes' if getattr(item, 'expose_cli', True) else 'no (advanced)'
        rows.append(f'| `{item.name}` | `{item.default!r}` | {exposed} | {item.help} |')
    return '\n'.join(rows) + '\n'


def _connect() -> str:
    from aiida_zmq.communicator import ZmqCommunicator

    rows = ['| option | default |', '|---|---|']
    for name, parameter in inspect.signature(ZmqCommunicator.__init__).parameters.items():
        if name in ('self', 'endpoint'):
            continue
        rows.append(f'| `{name}` | `{parameter.default!r}` |')
    return '\n'.join(rows) + '\n'


def _admin() -> str:
    from aiida_zmq.broker.admin import OPERATIONS

    rows = ['| op | arguments | what it does |', '|---|---|---|']
    for op, operation in sorted(OPERATIONS.items()):
        doc = (inspect.getdoc(operation.function) or '').split('\n')[0]
        rows.append(f'| `{op}` | {", ".join(f"`{name}`" for name in operation.arguments) or "-"} | {doc} |')
    return '\n'.join(rows) + '\n'


GENERATORS: dict[str, t.Callable[[], str]] = {
    'cli': _cli,
    'broker-config': _broker_config,
    'profile-config': _profile_config,
    'connect': _connect,
    'admin': _admin,
}
