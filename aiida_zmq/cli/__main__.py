"""``python -m aiida_zmq.cli``: the ``aiida-zmq`` command, for where the console script is not on ``PATH``."""

from .main import main

main()
