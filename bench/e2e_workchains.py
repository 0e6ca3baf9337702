"""Work chains of the end-to-end workload; the daemon workers import them through ``PYTHONPATH`` (the repo root)."""

from __future__ import annotations

from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction


@calcfunction
def add(x: orm.Int, y: orm.Int) -> orm.Int:
    return orm.Int(x.value + y.value)


class BenchChain(WorkChain):
    """One step calling a calcfunction: the launch queue, a worker's runner and the node store, nothing else."""

    @classmethod
    def define(cls, spec):  # type: ignore[no-untyped-def]
        super().define(spec)
        spec.input('x', valid_type=orm.Int)
        spec.input('y', valid_type=orm.Int)
        spec.output('sum', valid_type=orm.Int)
        spec.outline(cls.run_add)

    def run_add(self) -> None:
        self.out('sum', add(self.inputs.x, self.inputs.y))


class BenchParentChain(WorkChain):
    """Submits a :class:`BenchChain` and waits for it: a task plus the broadcast that wakes the parent."""

    @classmethod
    def define(cls, spec):  # type: ignore[no-untyped-def]
        super().define(spec)
        spec.input('x', valid_type=orm.Int)
        spec.output('sum', valid_type=orm.Int)
        spec.outline(cls.submit_child, cls.collect)
        spec.exit_code(400, 'ERROR_CHILD_FAILED', message='the child work chain failed')

    def submit_child(self):  # type: ignore[no-untyped-def]
        return ToContext(child=self.submit(BenchChain, x=self.inputs.x, y=orm.Int(1)))

    def collect(self):  # type: ignore[no-untyped-def]
        if not self.ctx.child.is_finished_ok:
            return self.exit_codes.ERROR_CHILD_FAILED
        self.out('sum', self.ctx.child.outputs.sum)
        return None
