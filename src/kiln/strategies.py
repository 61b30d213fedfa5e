"""Release strategies as pure planners.

A planner looks at a snapshot of an environment (the release being rolled
out and the ones already serving) and answers with the next actions. It
never touches processes, the router or the database: the daemon applies the
actions, persists them, takes a new snapshot and asks again, so a daemon
restarted at any point simply plans from what is recorded. Tests feed
snapshots and check the actions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.canary import FAIL, PASS, Verdict

# Give up on a release when this many of its instances have died before
# becoming ready (a crash loop), whatever the timeout says.
MAX_FAILED_STARTS = 3


@dataclass(frozen=True)
class Pool:
    """One release as the planner sees it."""

    release_id: int
    state: str
    weight: int
    replicas: int
    ready: int = 0  # ready and in rotation
    starting: int = 0
    failed: int = 0  # died or never became healthy, since the release began


@dataclass(frozen=True)
class Snapshot:
    target: Pool
    others: tuple[Pool, ...]  # the env's other live releases (serving or warm)
    now: float
    started: float  # when the target release began
    timeout: float  # how long instances may take to become ready
    keep_previous: float
    max_surge: int = 1
    max_unavailable: int = 0

    @property
    def serving(self) -> tuple[Pool, ...]:
        return tuple(p for p in self.others if p.state == "serving")

    @property
    def warm(self) -> tuple[Pool, ...]:
        return tuple(p for p in self.others if p.state == "warm")


@dataclass(frozen=True)
class Start:
    release_id: int
    count: int


@dataclass(frozen=True)
class Weights:
    """Set every listed release's share of traffic in one router update."""

    weights: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Drain:
    """Take ``count`` instances of a release out of rotation, then stop them."""

    release_id: int
    count: int


@dataclass(frozen=True)
class Mark:
    release_id: int
    state: str
    warm_for: float | None = None


@dataclass(frozen=True)
class Abort:
    reason: str


@dataclass(frozen=True)
class Wait:
    why: str = ""


@dataclass(frozen=True)
class Step:
    """Canary: move to step ``index``, sending it ``weight`` percent of traffic."""

    index: int
    weight: int


@dataclass(frozen=True)
class Judge:
    """Canary: record the verdict on the current step in the release's trail."""

    verdict: Verdict


@dataclass(frozen=True)
class Extend:
    """Canary: not enough to judge yet; measure the current step for longer."""

    reason: str


@dataclass(frozen=True)
class Pause:
    reason: str


Action = Start | Weights | Drain | Mark | Abort | Wait | Step | Judge | Extend | Pause


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = field(default_factory=tuple)
    done: bool = False


def _health_verdict(s: Snapshot) -> Abort | None:
    t = s.target
    if t.failed >= MAX_FAILED_STARTS:
        return Abort(
            f"{t.failed} instances crashed or failed their health check before becoming ready"
        )
    if s.now - s.started > s.timeout and t.ready < t.replicas:
        return Abort(
            f"only {t.ready} of {t.replicas} instances became ready within {s.timeout:.0f}s"
        )
    return None


def _start_missing(t: Pool, limit: int | None = None) -> Start | None:
    missing = t.replicas - t.ready - t.starting
    if limit is not None:
        missing = min(missing, limit)
    return Start(t.release_id, missing) if missing > 0 else None


def blue_green(s: Snapshot) -> Plan:
    """All new instances ready, then one atomic switch; the old release stays warm."""
    t = s.target
    verdict = _health_verdict(s)
    if verdict:
        return Plan((verdict,))
    start = _start_missing(t)
    if start:
        return Plan((start,))
    if t.ready < t.replicas:
        return Plan((Wait(f"{t.ready}/{t.replicas} ready"),))
    # Only the release just replaced stays warm; older warm ones retire now.
    return Plan(tuple(_promote(s)), done=True)


def rolling(s: Snapshot) -> Plan:
    """Replace instances in batches: new ones ready before old ones leave rotation."""
    t = s.target
    verdict = _health_verdict(s)
    if verdict:
        return Plan((verdict,))
    old_ready = sum(p.ready for p in s.serving)
    floor = max(t.replicas - s.max_unavailable, 0)
    actions: list[Action] = []
    # Surge: how many new instances may run beyond the wanted count.
    room = t.replicas + s.max_surge - (t.ready + t.starting + old_ready)
    start = _start_missing(t, max(room, 0))
    if start:
        actions.append(start)
    # Traffic follows capacity: each side's weight is its ready instances.
    weights = tuple([(t.release_id, t.ready)] + [(p.release_id, p.ready) for p in s.serving])
    # Old instances may leave as long as the ready total stays above the floor.
    excess = t.ready + old_ready - floor
    if t.ready == 0 and s.max_unavailable == 0:
        excess = 0
    drains: list[Action] = []
    for p in s.serving:
        take = min(p.ready, max(excess, 0))
        if take > 0:
            drains.append(Drain(p.release_id, take))
            excess -= take
    if t.ready >= t.replicas and old_ready == 0:
        final: list[Action] = [Weights(((t.release_id, 100),)), Mark(t.release_id, "serving")]
        final += [Mark(p.release_id, "retiring") for p in s.others]
        return Plan(tuple(final), done=True)
    if t.ready > 0 or old_ready > 0:
        actions.insert(0, Weights(weights))
    actions += drains
    if not actions:
        actions.append(Wait(f"{t.ready}/{t.replicas} new ready, {old_ready} old in rotation"))
    return Plan(tuple(actions))


def _promote(s: Snapshot) -> list[Action]:
    """The new release takes everything; the one it replaces stays warm."""
    t = s.target
    actions: list[Action] = [
        Weights(tuple([(t.release_id, 100)] + [(p.release_id, 0) for p in s.others])),
        Mark(t.release_id, "serving"),
    ]
    actions += [Mark(p.release_id, "warm", warm_for=s.keep_previous) for p in s.serving]
    actions += [Mark(p.release_id, "retiring") for p in s.warm]
    return actions


@dataclass(frozen=True)
class CanaryState:
    steps: tuple[int, ...]
    interval: float
    step: int = -1  # -1: no traffic yet
    step_started: float = 0.0
    paused: bool = False
    inconclusive: int = 0  # consecutive intervals the current step could not be judged
    max_inconclusive: int = 3
    verdict: Verdict | None = None  # the analysis of the current step, once it is due


def canary(s: Snapshot, c: CanaryState) -> Plan:
    """Shift traffic step by step, judging the canary against the stable release."""
    t = s.target
    if c.step < 0:
        verdict = _health_verdict(s)
        if verdict:
            return Plan((verdict,))
    elif t.failed >= MAX_FAILED_STARTS:
        return Plan((Abort(f"{t.failed} canary instances crashed or failed their health check"),))
    start = _start_missing(t)
    if c.step < 0:
        if start:
            return Plan((start,))
        if t.ready < t.replicas:
            return Plan((Wait(f"{t.ready}/{t.replicas} ready"),))
        if not s.serving:
            # Nothing to compare with: the first release of an environment.
            return Plan(tuple(_promote(s)), done=True)
        return Plan((Step(0, c.steps[0]),))
    actions: list[Action] = [start] if start else []
    if c.paused:
        return Plan((*actions, Wait("paused")))
    if s.now - c.step_started < c.interval or c.verdict is None:
        return Plan((*actions, Wait(f"step {c.step + 1}/{len(c.steps)} at {c.steps[c.step]}%")))
    v = c.verdict
    if v.result == FAIL:
        return Plan((Judge(v), Abort(f"canary failed at {c.steps[c.step]}%: {v.reason}")))
    if v.result != PASS:
        if c.inconclusive + 1 >= c.max_inconclusive:
            why = f"paused at {c.steps[c.step]}%: {v.reason} for {c.inconclusive + 1} intervals"
            return Plan((Judge(v), Pause(why + "; promote or abort")))
        return Plan((Judge(v), Extend(v.reason)))
    if c.step + 1 >= len(c.steps) or c.steps[c.step] >= 100:
        return Plan((Judge(v), *_promote(s)), done=True)
    return Plan((Judge(v), Step(c.step + 1, c.steps[c.step + 1])))


def promote(s: Snapshot) -> Plan:
    """All traffic to the target now: ``kiln promote``, and rollback to a warm
    release (one atomic switch, no instance started)."""
    return Plan(tuple(_promote(s)), done=True)


PLANNERS = {"blue-green": blue_green, "rolling": rolling, "rollback": blue_green}
