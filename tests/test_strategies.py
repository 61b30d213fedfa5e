"""The strategy planners, tested as data: given this snapshot, these actions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kiln import strategies as st
from kiln.canary import FAIL, INCONCLUSIVE, PASS, UNMEASURABLE, Verdict

OLD, NEW = 1, 2


def snap(target: st.Pool, *others: st.Pool, now: float = 100.0, **kw: float) -> st.Snapshot:
    params = {
        "started": 90.0,
        "timeout": 30.0,
        "keep_previous": 900.0,
        "max_surge": 1,
        "max_unavailable": 0,
    }
    params.update(kw)
    return st.Snapshot(target=target, others=others, now=now, **params)  # type: ignore[arg-type]


def new(**kw: int) -> st.Pool:
    return st.Pool(NEW, "starting", 0, 2, **kw)


def serving(ready: int = 2) -> st.Pool:
    return st.Pool(OLD, "serving", 100, 2, ready=ready)


def test_blue_green_starts_waits_then_switches_once() -> None:
    assert st.blue_green(snap(new(), serving())).actions == (st.Start(NEW, 2),)
    assert isinstance(st.blue_green(snap(new(starting=2), serving())).actions[0], st.Wait)
    assert st.blue_green(snap(new(ready=1, starting=1), serving())).actions[0] == st.Wait(
        "1/2 ready"
    )
    plan = st.blue_green(snap(new(ready=2), serving()))
    assert plan.done
    assert plan.actions == (
        st.Weights(((NEW, 100), (OLD, 0))),
        st.Mark(NEW, "serving"),
        st.Mark(OLD, "warm", warm_for=900.0),
    )


def test_blue_green_retires_the_older_warm_release() -> None:
    warm = st.Pool(3, "warm", 0, 2, ready=2)
    plan = st.blue_green(snap(new(ready=2), serving(), warm))
    assert st.Mark(3, "retiring") in plan.actions
    assert st.Mark(OLD, "warm", warm_for=900.0) in plan.actions


@pytest.mark.parametrize(
    ("target", "now", "reason"),
    [
        (new(failed=3), 100.0, "3 instances crashed"),
        (new(ready=1, starting=1), 200.0, "only 1 of 2 instances became ready within 30s"),
    ],
)
def test_blue_green_aborts_on_crash_loops_and_timeouts(
    target: st.Pool, now: float, reason: str
) -> None:
    (action,) = st.blue_green(snap(target, serving(), now=now)).actions
    assert isinstance(action, st.Abort) and reason in action.reason


def simulate_rolling(replicas: int, surge: int, unavailable: int) -> list[tuple[int, int]]:
    """Apply the rolling planner's actions to a fake world until done; returns
    (new ready, old ready) after each step. Started instances become ready next step."""
    old = st.Pool(OLD, "serving", 100, replicas, ready=replicas)
    target = st.Pool(NEW, "starting", 0, replicas)
    history = []
    for _ in range(50):
        plan = st.rolling(snap(target, old, max_surge=surge, max_unavailable=unavailable))
        target = replace(target, ready=target.ready + target.starting, starting=0)
        for action in plan.actions:
            if isinstance(action, st.Start):
                target = replace(target, starting=target.starting + action.count)
            elif isinstance(action, st.Drain):
                old = replace(old, ready=old.ready - action.count)
        history.append((target.ready, old.ready))
        if plan.done:
            return history
    raise AssertionError(f"rolling never finished: {history}")


@pytest.mark.parametrize(
    ("replicas", "surge", "unavailable"), [(2, 1, 0), (3, 1, 0), (4, 2, 1), (3, 0, 1), (5, 1, 2)]
)
def test_rolling_keeps_capacity_within_bounds(replicas: int, surge: int, unavailable: int) -> None:
    history = simulate_rolling(replicas, surge, unavailable)
    assert history[-1] == (replicas, 0)
    for new_ready, old_ready in history:
        assert new_ready + old_ready >= replicas - unavailable
        assert new_ready + old_ready <= replicas + surge


def test_rolling_weights_follow_ready_instances() -> None:
    plan = st.rolling(snap(new(ready=1), serving(2)))
    assert plan.actions[0] == st.Weights(((NEW, 1), (OLD, 2)))
    assert st.Drain(OLD, 1) in plan.actions


def canary_state(**kw: object) -> st.CanaryState:
    params: dict[str, object] = {"steps": (10, 50, 100), "interval": 30.0}
    params.update(kw)
    return st.CanaryState(**params)  # type: ignore[arg-type]


def verdict(result: str) -> Verdict:
    return Verdict(result, f"it was {result}", {"canary_requests": 100})


def test_canary_starts_every_instance_then_takes_the_first_step() -> None:
    assert st.canary(snap(new(), serving()), canary_state()).actions == (st.Start(NEW, 2),)
    assert st.canary(snap(new(ready=2), serving()), canary_state()).actions == (st.Step(0, 10),)


def test_canary_waits_out_the_interval() -> None:
    state = canary_state(step=0, step_started=90.0, verdict=verdict(FAIL))
    (action,) = st.canary(snap(new(ready=2), serving(), now=100.0), state).actions
    assert action == st.Wait("step 1/3 at 10%")


def test_canary_failed_check_aborts_with_the_numbers() -> None:
    state = canary_state(step=1, step_started=0.0, verdict=verdict(FAIL))
    judge, abort = st.canary(snap(new(ready=2), serving()), state).actions
    assert judge == st.Judge(state.verdict)  # type: ignore[arg-type]
    assert isinstance(abort, st.Abort) and abort.reason == "canary failed at 50%: it was fail"


def test_canary_passing_step_moves_on_and_the_last_promotes() -> None:
    state = canary_state(step=0, step_started=0.0, verdict=verdict(PASS))
    assert st.canary(snap(new(ready=2), serving()), state).actions[1] == st.Step(1, 50)
    last = replace(state, step=2)
    plan = st.canary(snap(new(ready=2), serving()), last)
    assert plan.done
    assert st.Weights(((NEW, 100), (OLD, 0))) in plan.actions
    assert st.Mark(NEW, "serving") in plan.actions


@pytest.mark.parametrize("result", [INCONCLUSIVE, UNMEASURABLE])
def test_canary_never_passes_without_a_judgement(result: str) -> None:
    state = canary_state(step=0, step_started=0.0, verdict=verdict(result), max_inconclusive=3)
    actions = st.canary(snap(new(ready=2), serving()), state).actions
    assert actions == (st.Judge(state.verdict), st.Extend(f"it was {result}"))  # type: ignore[arg-type]
    tired = replace(state, inconclusive=2)
    _, pause = st.canary(snap(new(ready=2), serving()), tired).actions
    assert (
        isinstance(pause, st.Pause)
        and "paused at 10%" in pause.reason
        and "3 intervals" in pause.reason
    )


def test_paused_canary_waits_and_replaces_dead_instances() -> None:
    state = canary_state(step=0, step_started=0.0, paused=True, verdict=verdict(PASS))
    assert st.canary(snap(new(ready=1), serving()), state).actions == (
        st.Start(NEW, 1),
        st.Wait("paused"),
    )


def test_canary_with_nothing_to_compare_promotes_at_once() -> None:
    plan = st.canary(snap(new(ready=2)), canary_state())
    assert plan.done and plan.actions[0] == st.Weights(((NEW, 100),))
