"""When ``pigeon run`` starts, restarts, stops and kills its app processes.

The supervisor runs ``workers`` copies of an app, one per *slot*. This core
decides; the adapter (``pigeon.cli.supervisor``) starts and signals the
processes, tells the core what happened with the time as ``now``, and does
the :data:`Action` values it gets back. A slot is in one state::

    RUNNING ──exited──▶ BACKOFF ──due──▶ RUNNING
      │  └──exited, cannot load──▶ FAILED ──reload──▶ RUNNING
      └──stop / reload──▶ STOPPING ──exited──▶ STOPPED (or RUNNING on reload)
                              └──kill_at──▶ killed, then as exited

Rule 1: every slot starts at once.
Rule 2: a process that exits while nobody asked it to is restarted after
``base_delay * factor ** (n - 1)`` seconds, capped at ``max_delay``, where
``n`` counts its crashes in a row; a process that had run ``stable_after``
seconds before it exited starts the count again (it crashed, but not in a
loop). Every crash and restart is counted.
Rule 3: a process that exits with :data:`EXIT_CANNOT_LOAD` (the app cannot be
imported or configured) is never restarted on its own: a restart would fail
the same way. Without reload, the supervisor stops the others and ends with
:data:`EXIT_CANNOT_LOAD_SUPERVISOR`; with reload, the slot waits for the next
change of the files (or starts at once if they changed while it was
loading them).
Rule 4: the first :meth:`Supervision.stop` tells every running process to
stop (drain) and cancels due restarts; a process still running ``grace``
plus :data:`KILL_MARGIN` seconds later is killed. A second ``stop`` kills
every process at once.
Rule 5: once every process has exited after a stop, the supervisor exits: 0
if each exited 0 on its own, 1 if one was killed or failed while draining,
130 after a second stop, or the code of rule 3.
Rule 6: :meth:`Supervision.reload` tells every running process to stop, with
the same deadline as rule 4, and starts each again as soon as it has exited,
without backoff (a failed slot too).

No I/O, no clock: callers pass ``now`` (monotonic seconds).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from ..errors import ConfigurationError

EXIT_CANNOT_LOAD = 78  # from an app process: EX_CONFIG of sysexits.h (rule 3)
EXIT_CANNOT_LOAD_SUPERVISOR = 2  # what ``pigeon run`` then exits with: a usage error
EXIT_FORCED = 130  # a second stop: the shell's code for an interrupted command
KILL_MARGIN = 5.0  # seconds past the grace for a process to close its links


class SlotState(enum.Enum):
    RUNNING = "running"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How crashed app processes are restarted (rule 2).

    Attributes:
        base_delay: seconds before the first restart.
        max_delay: the cap on any restart delay, in seconds.
        factor: growth of the delay per crash in a row.
        stable_after: seconds a process must run for its next crash to count
            as the first in a row again.
    """

    base_delay: float = 0.5
    max_delay: float = 30.0
    factor: float = 2.0
    stable_after: float = 30.0

    def __post_init__(self) -> None:
        # Written as "not (x >= 0)" so that NaN is refused too.
        if not (self.base_delay >= 0 and self.max_delay >= 0 and self.stable_after >= 0):
            raise ConfigurationError("restart delays must be numbers >= 0 seconds")
        if not (self.factor >= 1) or math.isinf(self.factor):
            raise ConfigurationError(f"factor must be >= 1, not {self.factor!r}")

    def delay(self, crashes: int) -> float:
        """Seconds before restarting a process after its ``crashes``-th crash in a row."""
        try:
            raw = self.base_delay * self.factor ** max(0, crashes - 1)
        except OverflowError:  # far past the cap anyway
            raw = self.max_delay
        return min(self.max_delay, raw)


@dataclass(frozen=True, slots=True)
class Start:
    """Start the app process of ``slot``."""

    slot: int


@dataclass(frozen=True, slots=True)
class Terminate:
    """Ask the process of ``slot`` to drain and stop (SIGTERM)."""

    slot: int


@dataclass(frozen=True, slots=True)
class Kill:
    """Stop the process of ``slot`` at once (SIGKILL)."""

    slot: int


@dataclass(frozen=True, slots=True)
class Restarting:
    """The process of ``slot`` crashed; it starts again in ``delay`` seconds
    (for the log: the :class:`Start` comes from :meth:`Supervision.poll`)."""

    slot: int
    delay: float
    crashes: int


@dataclass(frozen=True, slots=True)
class Exit:
    """Every process has exited: the supervisor exits with ``code``."""

    code: int


Action = Start | Terminate | Kill | Restarting | Exit


@dataclass(slots=True)
class _Slot:
    state: SlotState = SlotState.STOPPED
    started_at: float = 0.0
    crashes: int = 0  # in a row (rule 2)
    restart_at: float = math.inf
    kill_at: float = math.inf
    killed: bool = False
    restart_on_exit: bool = False  # a reload: start again as soon as it exits


@dataclass(slots=True)
class _Counts:
    started: int = 0
    crashed: int = 0
    restarted: int = 0
    killed: int = 0
    failed_to_load: int = 0
    reloads: int = 0


@dataclass
class Supervision:
    """The decisions of one ``pigeon run`` (see the module docstring)."""

    workers: int
    grace: float
    reload_enabled: bool = False
    policy: RestartPolicy = field(default_factory=RestartPolicy)

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or isinstance(self.workers, bool):
            raise ConfigurationError(f"workers must be an int, not {self.workers!r}")
        if self.workers < 1:
            raise ConfigurationError(f"workers must be at least 1, not {self.workers}")
        if not (self.grace >= 0) or math.isinf(self.grace):
            raise ConfigurationError(f"grace must be a number of seconds >= 0, not {self.grace!r}")
        self._slots = [_Slot() for _ in range(self.workers)]
        self._stopping = False
        self._forced = False
        self._unclean = False  # a process killed or failed while draining
        self._cannot_load = False
        self._exited = False
        self.counts = _Counts()

    # -- inputs ---------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Rule 1: start every slot."""
        return [self._start(n, now) for n in range(self.workers)]

    def exited(self, slot: int, code: int, now: float) -> list[Action]:
        """The process of ``slot`` exited with ``code`` (negative: killed by
        that signal)."""
        state = self._slots[slot]
        was = state.state
        if was not in (SlotState.RUNNING, SlotState.STOPPING):
            return []  # not ours to hear twice
        if code == EXIT_CANNOT_LOAD:
            self.counts.failed_to_load += 1
            state.kill_at = math.inf
            if state.restart_on_exit:
                # The files changed again since it started: try the new ones.
                return [self._start(slot, now)]
            state.state = SlotState.FAILED
            if not self.reload_enabled:
                self._cannot_load = True
                return [*self._begin_stop(now), *self._finish()]
            return self._finish()
        if was is SlotState.STOPPING:
            if self._stopping and (code != 0 or state.killed):
                self._unclean = True
            state.kill_at = math.inf
            if state.restart_on_exit and not self._stopping:
                state.restart_on_exit = False
                return [self._start(slot, now)]
            state.state = SlotState.STOPPED
            return self._finish()
        # Rule 2: it exited while nobody asked it to.
        self.counts.crashed += 1
        if self._stopping:
            state.state = SlotState.STOPPED
            self._unclean = True
            return self._finish()
        if now - state.started_at >= self.policy.stable_after:
            state.crashes = 0
        state.crashes += 1
        delay = self.policy.delay(state.crashes)
        state.state = SlotState.BACKOFF
        state.restart_at = now + delay
        return [Restarting(slot, delay, state.crashes)]

    def stop(self, now: float) -> list[Action]:
        """Rule 4: drain everything; the second call kills everything."""
        if self._stopping:
            self._forced = True
            actions: list[Action] = []
            for n, state in enumerate(self._slots):
                if state.state is SlotState.STOPPING and not state.killed:
                    actions.append(self._kill(n))
            return [*actions, *self._finish()]
        return [*self._begin_stop(now), *self._finish()]

    def reload(self, now: float) -> list[Action]:
        """Rule 6: restart every process (files changed)."""
        if self._stopping:
            return []
        self.counts.reloads += 1
        actions: list[Action] = []
        for n, state in enumerate(self._slots):
            if state.state is SlotState.RUNNING:
                actions.append(self._terminate(n, now))
                state.restart_on_exit = True
            elif state.state is SlotState.STOPPING:
                state.restart_on_exit = True
            elif state.state in (SlotState.BACKOFF, SlotState.FAILED):
                actions.append(self._start(n, now))
        return actions

    def poll(self, now: float) -> list[Action]:
        """What is due by ``now``: restarts after backoff, kills after the
        deadline."""
        actions: list[Action] = []
        for n, state in enumerate(self._slots):
            if state.state is SlotState.BACKOFF and now >= state.restart_at:
                self.counts.restarted += 1
                actions.append(self._start(n, now))
            elif state.state is SlotState.STOPPING and now >= state.kill_at and not state.killed:
                actions.append(self._kill(n))
        return actions

    # -- queries --------------------------------------------------------------

    def next_due(self) -> float:
        """When :meth:`poll` next has something to do (``inf``: nothing planned)."""
        due = [s.restart_at for s in self._slots if s.state is SlotState.BACKOFF]
        due += [s.kill_at for s in self._slots if s.state is SlotState.STOPPING and not s.killed]
        return min(due, default=math.inf)

    def state(self, slot: int) -> SlotState:
        return self._slots[slot].state

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stats(self) -> dict[str, int]:
        return {
            "workers": self.workers,
            "running": sum(s.state is SlotState.RUNNING for s in self._slots),
            "started": self.counts.started,
            "crashed": self.counts.crashed,
            "restarted": self.counts.restarted,
            "killed": self.counts.killed,
            "failed_to_load": self.counts.failed_to_load,
            "reloads": self.counts.reloads,
        }

    # -- transitions ----------------------------------------------------------

    def _start(self, slot: int, now: float) -> Start:
        state = self._slots[slot]
        state.state = SlotState.RUNNING
        state.started_at = now
        state.restart_at = state.kill_at = math.inf
        state.killed = False
        state.restart_on_exit = False
        self.counts.started += 1
        return Start(slot)

    def _terminate(self, slot: int, now: float) -> Terminate:
        state = self._slots[slot]
        state.state = SlotState.STOPPING
        state.kill_at = now + self.grace + KILL_MARGIN
        return Terminate(slot)

    def _kill(self, slot: int) -> Kill:
        self._slots[slot].killed = True
        self.counts.killed += 1
        return Kill(slot)

    def _begin_stop(self, now: float) -> list[Action]:
        self._stopping = True
        actions: list[Action] = []
        for n, state in enumerate(self._slots):
            state.restart_on_exit = False
            if state.state is SlotState.RUNNING:
                actions.append(self._terminate(n, now))
            elif state.state is SlotState.BACKOFF:
                state.state = SlotState.STOPPED
                state.restart_at = math.inf
        return actions

    def _finish(self) -> list[Action]:
        """Rule 5, once nothing runs any more (and only once)."""
        if self._exited or not self._stopping:
            return []
        if any(s.state in (SlotState.RUNNING, SlotState.STOPPING) for s in self._slots):
            return []
        self._exited = True
        if self._forced:
            return [Exit(EXIT_FORCED)]
        if self._cannot_load:
            return [Exit(EXIT_CANNOT_LOAD_SUPERVISOR)]
        return [Exit(1 if self._unclean else 0)]
