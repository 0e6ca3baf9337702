"""Side-by-side benchmarks: aiida-zmq against RabbitMQ and aiida-core's ``core.zeromq``.

Run ``python -m bench.run --help``. See ``docs/benchmarks.md``.
"""
