"""The broker process: the poll loop and everything only it uses.

Nothing here imports AiiDA. ``server.Broker`` is the loop; the other modules are its rooms (see docs/design.md).
"""
