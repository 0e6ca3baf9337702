"""``pytest --aiida-broker=zmq``: the session profile of aiida-core's pytest fixtures on aiida-zmq.

The option (and the ini setting ``aiida_broker = zmq``) belongs to the ``pytest11`` plugin :mod:`aiida_zmq.testing`;
this module is what it registers when the option is given, and is never a plugin by itself. It overrides aiida-core's
``aiida_profile_factory`` (``aiida.tools.pytest_fixtures``), not the tests: while pytest sets up ``aiida_profile``
(aiida-core's own, or the one a conftest defines, such as aiida-core's, which asks for ``core.rabbitmq`` or
``core.zeromq``), the factory makes a profile with the ``zmq`` broker and ``ZmqBroker``'s default configuration.
``aiida_profile_clean``, ``aiida_profile_clean_class`` and the daemon fixtures (``daemon_client``,
``started_daemon_client``, ``submit_and_await``) all use that profile. Profiles that tests make for themselves
(``aiida_profile_tmp``, or the factory called in a test) keep the broker they ask for: aiida-core's own tests of
"a profile without a broker" or "core.zeromq without its daemon" stay what they are.

Why registered late: of the fixtures of one name that plugins define, the last plugin registered wins (conftests win
over all plugins). :func:`configure` runs in ``pytest_configure``, after the initial conftests and their
``pytest_plugins`` (where ``aiida.tools.pytest_fixtures`` is loaded) are registered, so this ``aiida_profile_factory``
comes after aiida-core's and asks for it. Every test that uses ``aiida_profile`` checks its broker: with a session
profile made some other way the tests fail with what to do, rather than run on a broker that needs RabbitMQ after all.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator
from typing import Any

import pytest

__all__ = ('BROKER_CHOICES', 'BROKER_OPTION', 'add_option', 'configure')

BROKER_OPTION = 'aiida_broker'
BROKER_CHOICES = ('zmq', 'default')
PLUGIN_NAME = 'aiida_zmq.pytest_aiida_broker'

_HELP = (
    "zmq: the session profile of aiida-core's pytest fixtures (aiida_profile, aiida_profile_clean, the daemon "
    'fixtures) uses the aiida-zmq broker, whatever broker the conftest asks aiida_profile_factory for: no RabbitMQ '
    'needed. default: the profile is made as the fixtures ask.'
)

# > 0 while pytest sets up an ``aiida_profile`` fixture (more than one when an override asks for the one it overrides).
_session_profile_setups = 0


def add_option(parser: pytest.Parser) -> None:
    parser.getgroup('aiida-zmq').addoption(
        '--aiida-broker',
        dest=BROKER_OPTION,
        choices=BROKER_CHOICES,
        default=None,
        help=f'{_HELP} Default: the `{BROKER_OPTION}` ini setting, else default.',
    )
    parser.addini(BROKER_OPTION, f'{_HELP} (--aiida-broker overrides it)', default='')


def configure(config: pytest.Config) -> None:
    """Register this module as a plugin if the session asks for ``zmq``; a value it does not know is a usage error."""
    choice = config.getoption(BROKER_OPTION) or str(config.getini(BROKER_OPTION)).strip() or 'default'
    if choice not in BROKER_CHOICES:
        raise pytest.UsageError(
            f'{BROKER_OPTION} = {choice!r} in the pytest configuration is not a choice of aiida-zmq: use one of '
            f'{", ".join(BROKER_CHOICES)}.'
        )
    if choice == 'zmq' and not config.pluginmanager.has_plugin(PLUGIN_NAME):
        config.pluginmanager.register(sys.modules[__name__], PLUGIN_NAME)


# Old-style wrappers and plain hooks only: they work with every pluggy that pytest 7 and later install.
@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: Any) -> Generator[None, Any, None]:
    global _session_profile_setups

    if fixturedef.argname != 'aiida_profile':
        yield
        return
    _session_profile_setups += 1
    try:
        yield
    finally:
        _session_profile_setups -= 1


@pytest.hookimpl(trylast=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """After a test's fixtures are set up: its session profile must be on aiida-zmq, else it fails saying why.

    Checked for every test that uses the profile (not once when it is made: pytest caches the fixture's value, and a
    failure raised after that would reach the first test only).
    """
    profile = getattr(item, 'funcargs', {}).get('aiida_profile')
    if profile is None:
        return
    backend = getattr(profile, 'process_control_backend', None)
    if backend != 'zmq':
        pytest.fail(
            f'--aiida-broker=zmq: the session profile `aiida_profile` has the broker {backend!r}, not zmq: it was not '
            "made by aiida-core's `aiida_profile_factory` of aiida.tools.pytest_fixtures (a profile of the deprecated "
            'aiida.manage.tests.pytest_fixtures, or one loaded by name, cannot be switched). Make the `aiida_profile` '
            'fixture use `aiida_profile_factory(aiida_config, ...)`, or run without the option.',
            pytrace=False,
        )


@pytest.fixture(scope='session')
def aiida_profile_factory(aiida_profile_factory: Any) -> Callable[..., Any]:
    """aiida-core's ``aiida_profile_factory``, whose session profile has the ``zmq`` broker (see the module)."""
    from .testing import profile_on_zmq

    parent = aiida_profile_factory

    def factory(config: Any, **options: Any) -> Any:
        if _session_profile_setups:
            return profile_on_zmq(parent, config, **options)
        return parent(config, **options)

    factory.__wrapped__ = parent  # type: ignore[attr-defined]
    return factory
