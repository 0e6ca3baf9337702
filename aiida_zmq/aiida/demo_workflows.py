"""Work chains of ``aiida-zmq demo`` and of the end-to-end tests.

They live in the package (not in the tests) so that the daemon workers of any installation can import them: the
process type AiiDA stores is this module's path, which every worker of the same environment can load.
"""

from __future__ import annotations

from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction

__all__ = ('AddWorkChain', 'JobParentWorkChain', 'ParentWorkChain', 'add', 'held_code')


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


class JobParentWorkChain(WorkChain):
    """Submits a ``core.arithmetic.add`` job of its ``code`` and waits for it: a live process with a live child.

    With a code that waits (the tests' and the control benchmark's hold scripts), it stays in ``Waiting`` until
    released, as a real calculation does: what ``verdi process pause/play/kill`` act on.
    """

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('code', valid_type=orm.AbstractCode)
        spec.input('x', valid_type=orm.Int)
        spec.input('y', valid_type=orm.Int)
        spec.output('sum', valid_type=orm.Int)
        spec.outline(cls.submit_job, cls.collect)

    def submit_job(self):
        from aiida.calculations.arithmetic.add import ArithmeticAddCalculation

        inputs = {'code': self.inputs.code, 'x': self.inputs.x, 'y': self.inputs.y}
        options = {'resources': {'num_machines': 1}}
        return ToContext(job=self.submit(ArithmeticAddCalculation, **inputs, metadata={'options': options}))

    def collect(self) -> None:
        self.out('sum', self.ctx.job.outputs.sum)


def held_code(hold_file: str) -> orm.AbstractCode:
    """A code on ``localhost`` that waits while ``hold_file`` exists, then runs bash: a job its caller releases.

    For :class:`JobParentWorkChain` in the tests and the control benchmark: the job waits (it does not spin) as long as
    the caller wants, as a real calculation does. The code is made once per hold file.
    """
    import os
    import stat
    from pathlib import Path

    from aiida.common import NotExistent

    label = f'hold-{abs(hash(hold_file)) % 10**8}'
    try:
        return orm.load_code(f'{label}@localhost')
    except NotExistent:
        pass
    script = Path(hold_file).with_suffix('.sh')
    script.write_text(f'#!/bin/bash\nwhile [ -e {hold_file} ]; do sleep 0.1; done\nexec /bin/bash "$@"\n')
    os.chmod(script, script.stat().st_mode | stat.S_IXUSR)
    return orm.InstalledCode(
        label=label, computer=orm.load_computer('localhost'), filepath_executable=str(script)
    ).store()
