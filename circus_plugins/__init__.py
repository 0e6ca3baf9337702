"""Circus plugins of the aiida-zmq broker (installed as ``aiida_zmq.circus_plugins``).

- :class:`~aiida_zmq.circus_plugins.events.BrokerEventsPlugin`: listens to the arbiter's events and tells the broker
  at once when a process of another watcher (an AiiDA daemon worker) was reaped, so that the tasks it held go back to
  their queues now instead of after the heartbeat timeout.
- :class:`~aiida_zmq.circus_plugins.health.BrokerHealthPlugin`: checks the broker by a real round trip (``status``)
  and has the arbiter kill (and so respawn) a broker that stopped answering.
- :func:`~aiida_zmq.circus_plugins.hooks.extended_stats`: a watcher hook that shows the health plugin's verdict in
  ``circusctl stats --extended zmq-broker-<profile>``.

Each plugin runs in its own process (``python -c 'from circus import plugins; plugins.main()' ... CLASS``), as a watcher
of the arbiter: see :func:`aiida_zmq.circus.broker_watchers`.
"""
