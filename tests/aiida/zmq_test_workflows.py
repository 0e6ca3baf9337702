"""Processes only the tests run; the daemon workers import them through ``PYTHONPATH`` (see ``conftest.py``)."""

from __future__ import annotations

from aiida import orm
from aiida.engine import ToContext, WorkChain
from aiida.plugins import CalculationFactory


def _submit_add_job(workchain: WorkChain):
    """Submit a ``core.arithmetic.add`` job of the work chain's ``code``, ``x`` and ``y`` (a held code: it waits)."""
    calculation = CalculationFactory('core.arithmetic.add')
    options = {'resources': {'num_machines': 1}}
    inputs = {'code': workchain.inputs.code, 'x': workchain.inputs.x, 'y': workchain.inputs.y}
    return workchain.submit(calculation, **inputs, metadata={'options': options})


class TwoChildrenWorkChain(WorkChain):
    """Submits a quick child and waits for it, then a held job and waits for that.

    Killed in its second step, it has a finished child and a running one: aiida-core's ``Process.kill`` sends a kill
    to every child, and the finished one's has nobody to go to (``UnroutableError`` from ``rpc_send``, which it
    expects from the call itself).
    """

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('code', valid_type=orm.AbstractCode)
        spec.input('x', valid_type=orm.Int)
        spec.input('y', valid_type=orm.Int)
        spec.output('sum', valid_type=orm.Int)
        spec.outline(cls.submit_quick, cls.submit_job, cls.collect)

    def submit_quick(self):
        from aiida_zmq.aiida.demo_workflows import AddWorkChain

        return ToContext(quick=self.submit(AddWorkChain, x=self.inputs.x, y=self.inputs.y))

    def submit_job(self):
        return ToContext(job=_submit_add_job(self))

    def collect(self) -> None:
        self.out('sum', self.ctx.job.outputs.sum)
