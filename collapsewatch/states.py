"""The run-state vocabulary every medium shows: one enum, one derived display state.

The detector puts a run in one of five states (:class:`RunState`); run lists, the report,
the dashboard and trackers show one more, "recovered", derived by :func:`display_state`
from the state and whether the run ever collapsed. Every colour, style and code table in
the package is keyed by these members, so a new state cannot be shown in one place and
missing in another.
"""

from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
    """A run's state. Members compare equal to (and format as) their names' values."""

    EMPTY = "empty"  # no step recorded yet: nothing has been judged
    HEALTHY = "healthy"
    WARNING = "warning"  # a rule fired but the collapse is not confirmed
    COLLAPSED = "collapsed"  # the embeddings have contracted onto the loss's plateau
    DIVERGED = "diverged"  # non-finite loss or embeddings, or their scale exploded
    RECOVERED = "recovered"  # display only: healthy again after a collapse (display_state)

    # str() and f-strings give the value ("healthy"), on every Python ≥ 3.10, and a member
    # hashes as its value, so tables keyed by members answer lookups by plain strings.
    __str__ = str.__str__
    __hash__ = str.__hash__

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)


DETECTOR_STATES: tuple[RunState, ...] = (
    RunState.EMPTY,
    RunState.HEALTHY,
    RunState.WARNING,
    RunState.COLLAPSED,
    RunState.DIVERGED,
)
"""The states the detector itself reports (stored with every event)."""

FAILED_STATES: frozenset[RunState] = frozenset({RunState.COLLAPSED, RunState.DIVERGED})
"""States in which a run has failed (``collapsewatch analyze --fail-on-collapse`` exits 1)."""


def display_state(state: str, ever_collapsed: bool) -> RunState:
    """The state to show: "recovered" for a healthy run that once collapsed, else ``state``.

    Raises ValueError for a string that is not a state.
    """
    state = RunState(state)
    if state is RunState.HEALTHY and ever_collapsed:
        return RunState.RECOVERED
    return state
