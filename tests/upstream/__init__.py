"""The upstream projects' own test suites (aiida-core, plumpy, kiwipy) run against aiida-zmq: see ``run.py``."""
