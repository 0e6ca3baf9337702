"""Python runs this at the start of every process that a test of the upstream runner's plumpy and kiwipy sessions on
aiida-zmq starts (``zmq_in_place_of_rmq`` puts this folder on their ``PYTHONPATH``): the same swap of kiwipy's
RabbitMQ communicator for aiida-zmq's, on the session's broker. kiwipy's test_jupyter_notebook needs it: its Jupyter
kernel calls ``kiwipy.connect('amqp://127.0.0.1')``.
"""

import os

if os.environ.get('AIIDA_ZMQ_UPSTREAM_ENDPOINT'):
    import zmq_in_place_of_rmq

    zmq_in_place_of_rmq.install(os.environ['AIIDA_ZMQ_UPSTREAM_ENDPOINT'])
