"""The example plugin's test configuration, as many plugins have it: aiida-core's fixtures on a RabbitMQ profile.

The RabbitMQ port is one nothing listens on, so that a session that needs RabbitMQ after all fails at once, whether or
not this machine runs RabbitMQ: ``--aiida-broker=zmq`` must make it needless.
"""

import pytest

pytest_plugins = ['aiida.tools.pytest_fixtures']

NO_RABBITMQ = {
    'broker_protocol': 'amqp',
    'broker_username': 'guest',
    'broker_password': 'guest',
    'broker_host': '127.0.0.1',
    'broker_port': 9,
    'broker_virtual_host': '',
}


@pytest.fixture(scope='session', autouse=True)
def aiida_profile(aiida_config, aiida_profile_factory):
    with aiida_profile_factory(aiida_config, broker_backend='core.rabbitmq', broker_config=NO_RABBITMQ) as profile:
        yield profile
