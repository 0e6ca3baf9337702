"""Processes the daemon runs in the AiiDA tests; importable by the daemon workers through ``PYTHONPATH``."""

from __future__ import annotations

from aiida import orm
from aiida.engine import WorkChain, calcfunction


@calcfunction
def add(x: orm.Int, y: orm.Int) -> orm.Int:
    return orm.Int(x.value + y.value)


class AddWorkChain(WorkChain):
    """Calls a calcfunction: the smallest workflow that exercises the launch queue and the worker's runner."""

    @classmethod
    def define(cls, spec):  # type: ignore[no-untyped-def]
        super().define(spec)
        spec.input('x', valid_type=orm.Int)
        spec.input('y', valid_type=orm.Int)
        spec.output('sum', valid_type=orm.Int)
        spec.outline(cls.run_add)

    def run_add(self) -> None:
        self.out('sum', add(self.inputs.x, self.inputs.y))
