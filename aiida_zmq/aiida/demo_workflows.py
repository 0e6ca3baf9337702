"""Work chains of ``aiida-zmq demo`` and of the end-to-end tests.

They live in the package (not in the tests) so that the daemon workers of any installation can import them: the
process type AiiDA stores is this module's path, which every worker of the same environment can load.
"""

from __future__ import annotations

from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction

__all__ = ('AddWorkChain', 'ParentWorkChain', 'add')


@calcfunction
def add(x: orm.Int, y: orm.Int) -> orm.Int:
    """Add two integers, with provenance."""
    return orm.Int(x.value + y.value)


class AddWorkChain(WorkChain):
    """Calls a calcfunction: the smallest workflow that goes through the launch queue and a worker's runner."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('x', valid_type=orm.Int)
        spec.input('y', valid_type=orm.Int)
        spec.output('sum', valid_type=orm.Int)
        spec.outline(cls.run_add)

    def run_add(self) -> None:
        self.out('sum', add(self.inputs.x, self.inputs.y))


class ParentWorkChain(WorkChain):
    """Submits an :class:`AddWorkChain` and waits for it: a second task, and a wait on another worker's process."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('x', valid_type=orm.Int)
        spec.input('y', valid_type=orm.Int)
        spec.output('sum', valid_type=orm.Int)
        spec.exit_code(400, 'ERROR_CHILD_FAILED', message='the child work chain did not finish ok')
        spec.outline(cls.submit_child, cls.collect)

    def submit_child(self):
        return ToContext(child=self.submit(AddWorkChain, x=self.inputs.x, y=self.inputs.y))

    def collect(self):
        child = self.ctx.child
        if not child.is_finished_ok:
            return self.exit_codes.ERROR_CHILD_FAILED
        self.out('sum', child.outputs.sum)
        return None
