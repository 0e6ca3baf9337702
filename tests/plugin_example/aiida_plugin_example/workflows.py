"""The example plugin's processes: a calcfunction and a work chain that calls it and submits a child."""

from __future__ import annotations

from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction


@calcfunction
def add(x: orm.Int, y: orm.Int) -> orm.Int:
    return orm.Int(x.value + y.value)


class DoubleWorkChain(WorkChain):
    """Doubles an integer with the calcfunction."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('x', valid_type=orm.Int)
        spec.output('result', valid_type=orm.Int)
        spec.outline(cls.double)

    def double(self):
        self.out('result', add(self.inputs.x, self.inputs.x))


class DoubleSumWorkChain(WorkChain):
    """Adds two integers, then submits a :class:`DoubleWorkChain` on the sum and waits for it."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('x', valid_type=orm.Int)
        spec.input('y', valid_type=orm.Int)
        spec.output('result', valid_type=orm.Int)
        spec.exit_code(400, 'ERROR_CHILD_FAILED', message='the child work chain failed')
        spec.outline(cls.add, cls.submit_double, cls.collect)

    def add(self):
        self.ctx.sum = add(self.inputs.x, self.inputs.y)

    def submit_double(self):
        return ToContext(child=self.submit(DoubleWorkChain, x=self.ctx.sum))

    def collect(self):
        if not self.ctx.child.is_finished_ok:
            return self.exit_codes.ERROR_CHILD_FAILED
        self.out('result', self.ctx.child.outputs.result)
        return None
