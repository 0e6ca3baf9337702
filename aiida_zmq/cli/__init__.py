"""The ``aiida-zmq`` command: the group and ``serve`` in :mod:`aiida_zmq.cli.main`, one module per family of commands.

Empty on purpose: importing one command's module (a test, ``python -m aiida_zmq.cli.aiida``) loads only that one.
"""
