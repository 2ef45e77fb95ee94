"""The contender of the lock race test, in a module of its own: the test forks its processes from a forkserver
that has imported only this, so a fork costs what a small process costs, not what the test session weighs."""

import os

from probes.runs.rundir import RunLock


def contend(folder, start, results, done):
    start.wait()
    won = RunLock(folder).acquire()
    results.put(won)
    done.wait()  # hold it (and stay alive) until every contender has tried
    os._exit(0)
