"""The daemon's engine: supervises instances, drives releases, feeds the router.

One loop (``tick``) does everything under one lock, so there is a single
writer of the state: it checks every instance (alive? healthy?), asks the
strategy planner what the release in progress needs next and applies it,
keeps serving and warm releases at their replica count (a dead instance is
replaced by a new one, never restarted), retires what is no longer needed,
and pushes the router's pools whenever they change. API calls (release,
rollback, stop) take the same lock. Everything the engine decides is written
to SQLite before it acts on it, and ``recover`` rebuilds the picture from
that record plus the processes it finds, so killing the daemon anywhere is
safe.
"""

from __future__ import annotations

import http.client
import logging
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import strategies
from kiln.canary import UNMEASURABLE, Counters, Thresholds, Verdict, analyze
from kiln.errors import ReleaseError, RouterError, UsageError
from kiln.faults import fault_point
from kiln.home import Home
from kiln.logs.files import tail_lines
from kiln.releasespec import build_spec, free_port, listen_free, read_secrets
from kiln.rootfs import ensure_rootfs
from kiln.router.client import RouterClient, spawn_router
from kiln.runtime import InstanceHandle, InstanceSpec, Runtime
from kiln.state import ACTIVE_RELEASE, LIVE_INSTANCE, Instance, Release, State
from kiln.store import ImageStore
from kiln.testing.runner import passed_suites

log = logging.getLogger("kiln.daemon")

READY_PROBE_EVERY = 1.0  # seconds between health checks of a ready instance
UNHEALTHY_AFTER = 3  # consecutive failed checks before an instance is replaced
DRAIN_TIMEOUT = 30.0
STOP_GRACE = 10.0
BACKOFF_MAX = 30.0


@dataclass
class Backoff:
    failures: int = 0
    not_before: float = 0.0

    def failed(self, now: float) -> None:
        # The first replacement starts at once; only a crash loop waits,
        # 0.5 s, 1 s, 2 s, … up to BACKOFF_MAX.
        self.failures += 1
        delay = 0.0 if self.failures == 1 else 2 ** (self.failures - 2) * 0.5
        self.not_before = now + min(delay, BACKOFF_MAX)


@dataclass
class Probe:
    last: float = 0.0
    pending: Future[bool] | None = None


@dataclass
class Engine:
    home: Home
    runtime: Runtime
    state: State = field(init=False)
    store: ImageStore = field(init=False)
    router: RouterClient = field(init=False)
    lock: threading.RLock = field(default_factory=threading.RLock)
    handles: dict[str, InstanceHandle] = field(default_factory=dict)
    probes: dict[str, Probe] = field(default_factory=dict)
    backoff: dict[int, Backoff] = field(default_factory=dict)
    stopping: dict[str, Future[None]] = field(default_factory=dict)
    pushed: dict[str, Any] | None = None
    generation: int = 0
    workers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(16, "kiln-worker")
    )

    def __post_init__(self) -> None:
        self.home.ensure()
        self.state = State(self.home.state_db)
        self.store = ImageStore(self.home.images)
        self.router = RouterClient(self.home.run / "router.sock", timeout=10)

    # -- startup ----------------------------------------------------------
    def recover(self) -> None:
        """Adopt what still runs, stop what should not, and resync the router."""
        with self.lock:
            self.state.event("daemon.started", "daemon started; recovering state")
            found = {h.id: h for h in self.runtime.find(self.home.rootfs)}
            for inst in self.state.instances(states=LIVE_INSTANCE):
                handle = found.pop(inst.id, None)
                if handle is None and inst.pid is not None and inst.started is not None:
                    h = InstanceHandle(inst.id, inst.pid, inst.started)
                    handle = h if self.runtime.alive(h) else None
                if handle is None:
                    self._mark_failed(inst, "gone while the daemon was down")
                    continue
                if inst.pid != handle.pid:
                    self.state.update_instance(inst.id, pid=handle.pid, started=handle.started)
                self.handles[inst.id] = handle
            for stray in found.values():
                self.state.event(
                    "instance.stray", f"stopping stray instance {stray.id}", instance=stray.id
                )
                self.runtime.stop(stray, STOP_GRACE)
            self.ensure_router()
            self.pushed = None
            self.push_router(force=True)

    def ensure_router(self) -> None:
        if self.router.is_running():
            cfg = self.router.get_config()
            self.generation = max(self.generation, int(cfg.get("generation", 0)))
            return
        log_path = self.home.logs / "router.log"
        with open(log_path, "ab") as fh:
            spawn_router(
                self.home.run / "router.sock",
                self.home.run / "router.json",
                log=fh.fileno(),
                wait=10,
            )
        self.state.event("router.started", "router process started")
        cfg = self.router.get_config()
        self.generation = max(self.generation, int(cfg.get("generation", 0)))

    # -- the loop ----------------------------------------------------------
    def run(self, stop: threading.Event, interval: float = 0.1) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("engine tick failed")
                stop.wait(1.0)
            stop.wait(interval)

    def tick(self) -> None:
        with self.lock:
            now = time.time()
            self._supervise(now)
            for release in self.state.releases(states=ACTIVE_RELEASE):
                self._drive(release, now)
            self._maintain(now)
            self._retire(now)
            self.push_router()
            self._finish_drains(now)

    # -- instances ---------------------------------------------------------
    def _supervise(self, now: float) -> None:
        for inst in self.state.instances(states=LIVE_INSTANCE):
            if inst.id in self.stopping:
                continue
            handle = self.handles.get(inst.id)
            if handle is None or not self.runtime.alive(handle):
                self._mark_failed(inst, "exited")
                continue
            if inst.state == "draining":
                continue
            probe = self.probes.setdefault(inst.id, Probe())
            if probe.pending is not None:
                if not probe.pending.done():
                    continue
                ok = probe.pending.result()
                probe.pending = None
                self._on_probe(inst, ok, now)
                continue
            every = READY_PROBE_EVERY if inst.state == "ready" else 0.0
            if now - probe.last >= every:
                probe.last = now
                release = self.state.release(inst.release_id)
                probe.pending = self.workers.submit(_probe, inst.port, release.spec["health_path"])
            if inst.state == "starting":
                release = self.state.release(inst.release_id)
                if now - inst.created > release.spec["health_timeout"]:
                    self._mark_failed(
                        inst, f"not ready within {release.spec['health_timeout']:.0f}s", stop=True
                    )

    def _on_probe(self, inst: Instance, ok: bool, now: float) -> None:
        release = self.state.release(inst.release_id)
        if inst.state == "starting" and ok:
            wanted = release.state in ("starting", "switching", "serving", "warm")
            if not wanted:
                self._drain(inst, "its release is no longer wanted")
                return
            self.state.update_instance(
                inst.id, state="ready", ready_at=now, in_rotation=True, health_failures=0
            )
            self.backoff.pop(inst.release_id, None)
            self.state.event(
                "instance.ready",
                f"instance {inst.id} is ready ({now - inst.created:.1f}s after start)",
                env=inst.env,
                release=release.name,
                instance=inst.id,
                image=release.image,
            )
        elif inst.state == "ready" and not ok:
            failures = inst.health_failures + 1
            self.state.update_instance(inst.id, health_failures=failures)
            if failures >= UNHEALTHY_AFTER:
                self.state.event(
                    "instance.unhealthy",
                    f"instance {inst.id} failed {failures} health checks; replacing it",
                    env=inst.env,
                    release=release.name,
                    instance=inst.id,
                )
                self._drain(inst, "unhealthy")
        elif inst.state == "ready" and ok and inst.health_failures:
            self.state.update_instance(inst.id, health_failures=0)

    def _mark_failed(self, inst: Instance, why: str, stop: bool = False) -> None:
        self.state.update_instance(
            inst.id, state="failed", in_rotation=False, stopped_at=time.time(), exit_reason=why
        )
        self.probes.pop(inst.id, None)
        handle = self.handles.pop(inst.id, None)
        if stop and handle is not None:
            self.workers.submit(self.runtime.stop, handle, 0.5)
        self.backoff.setdefault(inst.release_id, Backoff()).failed(time.time())
        release = self.state.release(inst.release_id)
        self.state.event(
            "instance.failed",
            f"instance {inst.id} {why}",
            env=inst.env,
            release=release.name,
            instance=inst.id,
            image=release.image,
            data={"log_tail": self.log_tail(inst.id)},
        )

    def _drain(self, inst: Instance, why: str) -> None:
        """Out of rotation now; stopped once the router says its requests are done."""
        self.state.update_instance(inst.id, state="draining", in_rotation=False, drain_since=None)
        self.probes.pop(inst.id, None)
        self.state.event(
            "instance.draining", f"draining {inst.id}: {why}", env=inst.env, instance=inst.id
        )

    def _finish_drains(self, now: float) -> None:
        draining = [
            i for i in self.state.instances(states=("draining",)) if i.id not in self.stopping
        ]
        if not draining:
            return
        inflight = self._inflight()
        for inst in draining:
            if inst.drain_since is None:
                continue  # not yet confirmed out of the router's pools
            if inflight.get(inst.id, 0) > 0 and now - inst.drain_since < DRAIN_TIMEOUT:
                continue
            handle = self.handles.get(inst.id)
            if handle is None:
                self.state.update_instance(
                    inst.id, state="stopped", stopped_at=now, exit_reason="drained"
                )
                continue
            self.stopping[inst.id] = self.workers.submit(self._stop_instance, inst, handle)

    def _stop_instance(self, inst: Instance, handle: InstanceHandle) -> None:
        try:
            self.runtime.stop(handle, STOP_GRACE)
        finally:
            with self.lock:
                self.state.update_instance(
                    inst.id, state="stopped", stopped_at=time.time(), exit_reason="drained"
                )
                self.handles.pop(inst.id, None)
                self.stopping.pop(inst.id, None)
                self.state.event(
                    "instance.stopped",
                    f"instance {inst.id} stopped",
                    env=inst.env,
                    instance=inst.id,
                )

    def _inflight(self) -> dict[str, int]:
        try:
            stats = self.router.stats()
        except RouterError:
            return {}
        out: dict[str, int] = {}
        for env in stats.get("envs", {}).values():
            for rel in env.get("releases", {}).values():
                for iid, inst in rel.get("instances", {}).items():
                    out[iid] = out.get(iid, 0) + int(inst.get("inflight", 0))
        return out

    def start_instance(self, release: Release) -> Instance:
        spec = release.spec
        iid = f"{release.env}-{release.name}-{secrets.token_hex(3)}"
        port = free_port()
        inst = self.state.create_instance(iid, release, port)
        env = dict(spec["image_env"])
        env.update(spec["vars"])
        if spec.get("secrets_file"):
            env.update(read_secrets(Path(spec["secrets_file"])))
        env.update(
            {
                "PORT": str(port),
                "KILN_APP": release.app,
                "KILN_ENV": release.env,
                "KILN_RELEASE": release.name,
                "KILN_IMAGE": release.image,
                "KILN_INSTANCE": iid,
            }
        )
        rootfs = ensure_rootfs(self.store, self.home.rootfs, release.image)
        handle = self.runtime.start(
            InstanceSpec(
                id=iid,
                image=release.image,
                rootfs=rootfs,
                command=tuple(spec["command"]),
                env=env,
                workdir=spec["workdir"],
                uid=spec["uid"],
                gid=spec["gid"],
                port=port,
                log_path=self.instance_log(iid),
            )
        )
        fault_point("daemon.instance-spawned")
        self.handles[iid] = handle
        self.state.update_instance(iid, pid=handle.pid, started=handle.started)
        self.state.event(
            "instance.started",
            f"instance {iid} started on port {port}",
            env=release.env,
            release=release.name,
            instance=iid,
            image=release.image,
        )
        return inst

    def instance_log(self, instance_id: str) -> Path:
        return self.home.logs / "instances" / f"{instance_id}.log"

    def log_tail(self, instance_id: str, lines: int = 12) -> list[str]:
        return tail_lines(self.instance_log(instance_id), lines)

    # -- releases ----------------------------------------------------------
    def _pool(self, release: Release) -> strategies.Pool:
        insts = self.state.instances(release_id=release.id)
        return strategies.Pool(
            release_id=release.id,
            state=release.state,
            weight=release.weight,
            replicas=release.replicas,
            ready=sum(1 for i in insts if i.state == "ready" and i.in_rotation),
            starting=sum(1 for i in insts if i.state == "starting"),
            failed=sum(1 for i in insts if i.state == "failed" and i.created >= release.created),
        )

    def _snapshot(self, release: Release, now: float) -> strategies.Snapshot:
        others = tuple(
            self._pool(r)
            for r in self.state.releases(env=release.env, states=("serving", "warm"))
            if r.id != release.id
        )
        spec = release.spec
        return strategies.Snapshot(
            target=self._pool(release),
            others=others,
            now=now,
            started=release.created,
            timeout=spec["health_timeout"] + 5.0,
            keep_previous=spec["keep_previous"],
            max_surge=spec["max_surge"],
            max_unavailable=spec["max_unavailable"],
        )

    def _drive(self, release: Release, now: float) -> None:
        if release.strategy == "canary":
            plan = strategies.canary(self._snapshot(release, now), self._canary_state(release, now))
        else:
            plan = strategies.PLANNERS[release.strategy](self._snapshot(release, now))
        for action in plan.actions:
            self.apply(release, action, now)
            if isinstance(action, strategies.Abort):
                return
        if plan.done:
            seconds = round(time.time() - release.created, 3)
            self.state.event(
                "release.done",
                f"{release.name} is serving 100% of {release.env}",
                env=release.env,
                release=release.name,
                image=release.image,
                data={"seconds": seconds},
            )
            if release.rollback_of is not None:
                back_to = self.state.release(release.rollback_of).name
                self.state.event(
                    "rollback.done",
                    f"{release.name} serves {release.env} again with {back_to}'s image "
                    "on new instances",
                    env=release.env,
                    release=release.name,
                    image=release.image,
                    data={"seconds": seconds, "kind": "rebuilt"},
                )

    def apply(self, release: Release, action: strategies.Action, now: float) -> None:
        if isinstance(action, strategies.Start):
            backoff = self.backoff.get(action.release_id)
            if backoff and now < backoff.not_before:
                return
            target = self.state.release(action.release_id)
            for _ in range(action.count):
                self.start_instance(target)
        elif isinstance(action, strategies.Weights):
            changed = False
            for rid, weight in action.weights:
                if self.state.release(rid).weight != weight:
                    self.state.update_release(rid, weight=weight)
                    changed = True
            if changed:
                fault_point("daemon.before-switch")
                self.push_router()
                names = {self.state.release(rid).name: w for rid, w in action.weights}
                self.state.event(
                    "traffic.switched",
                    "traffic: " + ", ".join(f"{n} {w}" for n, w in names.items()),
                    env=release.env,
                    release=release.name,
                    data={"weights": names},
                )
                fault_point("daemon.after-switch")
        elif isinstance(action, strategies.Drain):
            ready = [
                i
                for i in self.state.instances(release_id=action.release_id, states=("ready",))
                if i.in_rotation
            ]
            for inst in ready[: action.count]:
                self._drain(inst, "replaced by the new release")
        elif isinstance(action, strategies.Mark):
            self._mark(action, now)
        elif isinstance(action, strategies.Abort):
            self.abort(release, action.reason)
        elif isinstance(action, strategies.Step):
            self._canary_step(release, action, now)
        elif isinstance(action, strategies.Judge):
            self._judge(release, action.verdict, now)
        elif isinstance(action, strategies.Extend):
            progress = dict(self.state.release(release.id).progress)
            progress.update(step_started=now, inconclusive=progress.get("inconclusive", 0) + 1)
            self.state.update_release(release.id, progress=progress)
        elif isinstance(action, strategies.Pause):
            self.set_paused(release, True, action.reason)

    # -- canary ------------------------------------------------------------
    def _stable(self, release: Release) -> Release | None:
        serving = [
            r
            for r in self.state.releases(env=release.env, states=("serving",))
            if r.id != release.id
        ]
        return serving[-1] if serving else None

    def _counters(self, release: Release) -> tuple[Counters, Counters] | None:
        """Current router counters of (canary, stable), or None if unreadable."""
        try:
            stats = self.router.stats()
        except RouterError:
            return None
        releases = stats.get("envs", {}).get(release.env, {}).get("releases", {})
        stable = self._stable(release)
        empty: dict[str, Any] = {}
        canary = Counters.from_router(releases.get(release.name, empty))
        base = (
            Counters.from_router(releases.get(stable.name, empty)) if stable else Counters.empty()
        )
        return canary, base

    def _canary_state(self, release: Release, now: float) -> strategies.CanaryState:
        cfg = release.spec["canary"]
        progress = release.progress
        step = int(progress.get("step", -1))
        verdict = None
        due = step >= 0 and now - float(progress.get("step_started", 0)) >= cfg["interval"]
        if due and not progress.get("paused"):
            verdict = self._measure(release)
        return strategies.CanaryState(
            steps=tuple(cfg["steps"]),
            interval=cfg["interval"],
            step=step,
            step_started=float(progress.get("step_started", 0)),
            paused=bool(progress.get("paused")),
            inconclusive=int(progress.get("inconclusive", 0)),
            max_inconclusive=int(cfg["thresholds"]["max_inconclusive"]),
            verdict=verdict,
        )

    def _window(self, release: Release) -> tuple[Counters | None, Counters | None] | None:
        """The canary's requests this step and the stable's since the canary began."""
        current = self._counters(release)
        if current is None:
            return None
        progress = release.progress
        canary_base = Counters.from_router(progress.get("baseline", {}))
        stable_base = Counters.from_router(progress.get("stable_baseline", {}))
        return current[0].minus(canary_base), current[1].minus(stable_base)

    def _measure(self, release: Release) -> Verdict:
        window = self._window(release)
        thresholds = Thresholds(**release.spec["canary"]["thresholds"])
        if window is None:
            return Verdict(UNMEASURABLE, "the router's counters could not be read", {})
        canary, stable = window
        if canary is None or stable is None:
            # The router restarted and its counters began again: measure afresh.
            self._rebaseline(release, stable_too=True)
            return Verdict(
                UNMEASURABLE,
                "the router's counters went back to zero (restart); measuring again",
                {},
            )
        return analyze(canary, stable, thresholds)

    def _rebaseline(self, release: Release, stable_too: bool) -> None:
        current = self._counters(release)
        progress = dict(self.state.release(release.id).progress)
        if current is not None:
            progress["baseline"] = current[0].to_json()
            if stable_too:
                progress["stable_baseline"] = current[1].to_json()
        self.state.update_release(release.id, progress=progress)

    def _canary_step(self, release: Release, step: strategies.Step, now: float) -> None:
        stable = self._stable(release)
        weights = [(release.id, step.weight)] + ([(stable.id, 100 - step.weight)] if stable else [])
        self.apply(release, strategies.Weights(tuple(weights)), now)
        progress = dict(self.state.release(release.id).progress)
        progress.update(step=step.index, step_started=time.time(), inconclusive=0, paused=False)
        self.state.update_release(release.id, progress=progress)
        self._rebaseline(self.state.release(release.id), stable_too=step.index == 0)
        steps = release.spec["canary"]["steps"]
        self.state.event(
            "canary.step",
            f"canary {release.name} step {step.index + 1}/{len(steps)}: {step.weight}% of traffic",
            env=release.env,
            release=release.name,
            image=release.image,
            data={"step": step.index, "weight": step.weight},
        )

    def _judge(self, release: Release, verdict: Verdict, now: float) -> None:
        current = self.state.release(release.id)
        step = int(current.progress.get("step", -1))
        steps = current.spec["canary"]["steps"]
        entry = {
            "at": now,
            "step": step + 1,
            "weight": steps[step] if 0 <= step < len(steps) else None,
            "thresholds": current.spec["canary"]["thresholds"],
            **verdict.to_json(),
        }
        self.state.update_release(release.id, trail=[*current.trail, entry])
        self.state.event(
            "canary.verdict",
            f"canary {release.name} at {entry['weight']}%: {verdict.result}: {verdict.reason}",
            env=release.env,
            release=release.name,
            image=release.image,
            data=entry,
        )

    def set_paused(self, release: Release, paused: bool, why: str) -> None:
        progress = dict(self.state.release(release.id).progress)
        progress["paused"] = paused
        if not paused:
            progress.update(step_started=time.time(), inconclusive=0)
        self.state.update_release(release.id, progress=progress)
        kind = "canary.paused" if paused else "canary.resumed"
        self.state.event(
            kind, f"canary {release.name} {why}", env=release.env, release=release.name
        )

    def _canary_in(self, env: str) -> Release:
        holder = self.state.lock_holder(env)
        release = self.state.release(holder) if holder is not None else None
        if release is None or release.strategy != "canary":
            raise UsageError(f"no canary release is in progress in {env!r}")
        return release

    def steer(self, env: str, command: str, who: str) -> Release:
        """promote / pause / resume the canary in progress in ``env``."""
        with self.lock:
            release = self._canary_in(env)
            now = time.time()
            if command == "pause":
                self.set_paused(release, True, f"paused by {who}")
            elif command == "resume":
                self.set_paused(release, False, f"resumed by {who}")
            elif command == "promote":
                if self._pool(release).ready < 1:
                    raise UsageError(f"{release.name} has no ready instance yet; wait, or abort it")
                self.state.event(
                    "canary.promoted",
                    f"{release.name} promoted by {who}",
                    env=env,
                    release=release.name,
                    who=who,
                )
                for action in strategies.promote(self._snapshot(release, now)).actions:
                    self.apply(release, action, now)
            else:
                raise UsageError(f"unknown canary command {command!r}")
            return self.state.release(release.id)

    def canary_live(self, release: Release) -> dict[str, Any] | None:
        """What the CLI shows while a canary runs: this step's numbers so far."""
        if release.strategy != "canary" or release.progress.get("step", -1) < 0:
            return None
        window = self._window(release)
        numbers: dict[str, Any] = {}
        if window is not None and window[0] is not None and window[1] is not None:
            thresholds = Thresholds(**{**release.spec["canary"]["thresholds"], "min_requests": 1})
            numbers = dict(analyze(window[0], window[1], thresholds).numbers)
            numbers["stable_requests"] = window[1].total
            numbers["stable_error_rate"] = (
                round(window[1].errors(thresholds.count_4xx) / window[1].total, 4)
                if window[1].total
                else None
            )
        steps = release.spec["canary"]["steps"]
        step = int(release.progress["step"])
        return {
            "step": step + 1,
            "steps": steps,
            "weight": steps[step],
            "paused": bool(release.progress.get("paused")),
            "numbers": numbers,
        }

    def _mark(self, action: strategies.Mark, now: float) -> None:
        target = self.state.release(action.release_id)
        fields: dict[str, Any] = {"state": action.state}
        if action.state == "serving":
            fields.update(serving_since=now, finished=now, warm_until=None)
        if action.state == "warm":
            fields.update(warm_until=now + (action.warm_for or 0.0))
        self.state.update_release(target.id, **fields)
        self.state.event(
            f"release.{action.state}",
            f"{target.name} is now {action.state}",
            env=target.env,
            release=target.name,
            image=target.image,
        )

    def abort(self, release: Release, reason: str) -> None:
        failed = [i for i in self.state.instances(release_id=release.id) if i.state == "failed"]
        tail = self.log_tail(failed[-1].id) if failed else []
        if release.weight:
            self.state.update_release(release.id, weight=0)
            self.push_router()
        for inst in self.state.instances(release_id=release.id, states=LIVE_INSTANCE):
            if inst.state == "starting":
                self._mark_failed(inst, "release aborted", stop=True)
            elif inst.state == "ready":
                self._drain(inst, "release aborted")
        detail = {"reason": reason, "instance": failed[-1].id if failed else None, "log_tail": tail}
        self.state.update_release(release.id, state="aborted", finished=time.time(), reason=reason)
        # Restore the previous release's full weight if a rolling release had shifted some.
        serving = self.state.releases(env=release.env, states=("serving",))
        for prev in serving:
            if prev.weight != 100:
                self.state.update_release(prev.id, weight=100)
        self.push_router()
        self.state.event(
            "release.aborted",
            f"{release.name} aborted: {reason}",
            env=release.env,
            release=release.name,
            image=release.image,
            data=detail,
        )

    def _maintain(self, now: float) -> None:
        """Serving and warm releases keep their replica count: the dead are replaced."""
        rolling_envs = {
            r.env for r in self.state.releases(states=ACTIVE_RELEASE) if r.strategy == "rolling"
        }
        for release in self.state.releases(states=("serving", "warm")):
            if release.env in rolling_envs and release.state == "serving":
                continue  # a rolling release is replacing these on purpose
            pool = self._pool(release)
            missing = release.replicas - pool.ready - pool.starting
            if missing <= 0:
                continue
            backoff = self.backoff.get(release.id)
            if backoff and now < backoff.not_before:
                continue
            why = self._replacement_reason(release)
            for _ in range(missing):
                inst = self.start_instance(release)
                self.state.event(
                    "instance.replacement",
                    f"started {inst.id} to keep {release.name} at {release.replicas} "
                    f"instances ({why})",
                    env=release.env,
                    release=release.name,
                    instance=inst.id,
                    data={"reason": why},
                )

    def _replacement_reason(self, release: Release) -> str:
        """Why a release is short of instances: the one that left it last, and how."""
        gone = [
            i
            for i in self.state.instances(release_id=release.id, states=("failed", "stopped"))
            if i.stopped_at is not None
        ]
        if not gone:
            return "below its replica count"
        last = max(gone, key=lambda i: i.stopped_at or 0.0)
        return f"{last.id} {last.exit_reason or last.state}"

    def _retire(self, now: float) -> None:
        for release in self.state.releases(states=("warm",)):
            if release.warm_until is not None and now >= release.warm_until:
                self._mark(strategies.Mark(release.id, "retiring"), now)
        for release in self.state.releases(states=("retiring",)):
            live = self.state.instances(release_id=release.id, states=LIVE_INSTANCE)
            for inst in live:
                if inst.state == "ready":
                    self._drain(inst, f"{release.name} retires")
                elif inst.state == "starting":
                    self._mark_failed(inst, "its release retired", stop=True)
            if not live:
                self.state.update_release(
                    release.id, state="retired", weight=0, finished=release.finished or now
                )
                self.state.event(
                    "release.retired",
                    f"{release.name} retired",
                    env=release.env,
                    release=release.name,
                )

    # -- router ------------------------------------------------------------
    def router_config(self) -> dict[str, Any]:
        envs: dict[str, Any] = {}
        for release in self.state.releases(
            states=("starting", "switching", "serving", "warm", "retiring")
        ):
            ready = [
                {"id": i.id, "addr": i.addr}
                for i in self.state.instances(release_id=release.id, states=("ready",))
                if i.in_rotation
            ]
            env = envs.setdefault(
                release.env, {"listen": release.spec["listen"], "pools": [], "sticky": False}
            )
            if release.state in ("serving", "starting", "switching"):
                env["listen"] = release.spec["listen"]
            if ready:
                pool: dict[str, Any] = {
                    "release": release.name,
                    "weight": release.weight,
                    "instances": ready,
                }
                # Testers pin themselves with X-Kiln-Release: canary (or preview, or stable).
                if release.state == "serving":
                    pool["aliases"] = ["stable"]
                elif release.state in ACTIVE_RELEASE:
                    pool["aliases"] = ["canary" if release.strategy == "canary" else "preview"]
                env["pools"].append(pool)
        return envs

    def push_router(self, force: bool = False) -> None:
        envs = self.router_config()
        if not force and envs == self.pushed:
            self._confirm_drains()
            return
        self.generation += 1
        try:
            self.router.put_config({"generation": self.generation, "envs": envs})
        except RouterError as exc:
            if not self.router.is_running():
                self.ensure_router()
                self.router.put_config({"generation": self.generation, "envs": envs})
            else:
                raise ReleaseError(str(exc)) from exc
        self.pushed = envs
        self._confirm_drains()

    def _confirm_drains(self) -> None:
        for inst in self.state.instances(states=("draining",)):
            if inst.drain_since is None:
                self.state.update_instance(inst.id, drain_since=time.time())

    # -- API operations ----------------------------------------------------
    def submit_release(
        self,
        image: str,
        env: str,
        strategy: str | None,
        who: str,
        steps: list[int] | None = None,
        interval: float | None = None,
        force: bool = False,
    ) -> Release:
        self.runtime.check()
        record = self.store.resolve(image)
        rootfs = ensure_rootfs(self.store, self.home.rootfs, record.digest)
        spec = build_spec(
            self.store, record, rootfs, env, self.home.root, strategy, steps, interval
        )
        missing = self._untested(record.digest, spec["require_tests"])
        if missing and not force:
            raise UsageError(
                f"{env!r} only takes images that passed their tests; {record.short} lacks a passing "
                f"attestation for: {', '.join(missing)}",
                hint=f"run 'kiln test {record.short}', or release with --force (it is recorded)",
            )
        with self.lock:
            current = self.router_config().get(env)
            if (current is None or current["listen"] != spec["listen"]) and not listen_free(
                spec["listen"]
            ):
                raise UsageError(
                    f"{spec['listen']} (environment {env!r}) is already in use by another program",
                    hint="stop it, or change [env." + env + "].listen in kiln.toml and bake again",
                )
            release = self.state.create_release(
                env=env,
                app=record.app,
                image=record.digest,
                strategy=spec["strategy"],
                replicas=spec["replicas"],
                spec=spec,
                who=who,
            )
            self.state.event(
                "release.started",
                f"{release.name} of {record.app} ({record.short}) to {env} by {spec['strategy']}",
                env=env,
                release=release.name,
                image=record.digest,
                who=who,
            )
            if missing:
                self.state.event(
                    "release.forced",
                    f"{release.name} forced into {env} by {who} without passing: {', '.join(missing)}",
                    env=env,
                    release=release.name,
                    image=record.digest,
                    who=who,
                    data={"missing": missing},
                )
            try:
                self.push_router()
            except (ReleaseError, RouterError) as exc:
                self.abort(release, f"router refused the listener: {exc}")
                raise UsageError(str(exc)) from exc
            return self.state.release(release.id)

    def _untested(self, digest: str, required: list[str]) -> list[str]:
        """The required suites without a passing result on record, described."""
        if not required:
            return []
        results = passed_suites(self.store, digest)
        return [
            f"{suite} ({results.get(suite, 'never run')})"
            for suite in required
            if results.get(suite) != "passed"
        ]

    def rollback(self, env: str, to: int | None, who: str) -> Release:
        with self.lock:
            serving = self.state.releases(env=env, states=("serving",))
            if not serving:
                raise UsageError(f"nothing is serving in {env!r}: there is nothing to roll back")
            current = serving[-1]
            if self.state.lock_holder(env) is not None:
                raise UsageError(
                    f"a release is in progress in {env!r}",
                    hint=f"abort it with 'kiln abort --env {env}' (or wait)",
                )
            target = self._rollback_target(env, current, to)
            now = time.time()
            if target.state == "warm" and self._pool(target).ready >= 1:
                self.state.event(
                    "rollback.started",
                    f"rollback of {env} from {current.name} to warm {target.name}",
                    env=env,
                    release=target.name,
                    image=target.image,
                    who=who,
                )
                plan = strategies.promote(self._snapshot(target, now))
                for action in plan.actions:
                    self.apply(target, action, now)
                self.state.event(
                    "rollback.done",
                    f"{target.name} serves {env} again (instant switch, no instance started)",
                    env=env,
                    release=target.name,
                    image=target.image,
                    who=who,
                    data={"seconds": round(time.time() - now, 4)},
                )
                return self.state.release(target.id)
            # Not warm any more: bring the old image back as new instances (phoenix).
            spec = dict(target.spec)
            spec["strategy"] = "blue-green"
            release = self.state.create_release(
                env=env,
                app=target.app,
                image=target.image,
                strategy="rollback",
                replicas=target.replicas,
                spec=spec,
                who=who,
                rollback_of=target.id,
            )
            self.state.event(
                "rollback.started",
                f"rollback of {env} to {target.name}'s image as new release {release.name}",
                env=env,
                release=release.name,
                image=target.image,
                who=who,
            )
            return release

    def _rollback_target(self, env: str, current: Release, to: int | None) -> Release:
        if to is not None:
            target = self.state.release_by_number(env, to)
            if target is None:
                raise UsageError(
                    f"{env!r} has no release r{to}", hint=f"see 'kiln history --env {env}'"
                )
            if target.id == current.id:
                raise UsageError(f"r{to} is already serving {env!r}")
            if target.state == "aborted":
                raise UsageError(
                    f"r{to} was aborted; it never served, so it cannot be rolled back to"
                )
            return target
        earlier = [
            r
            for r in self.state.releases(env=env)
            if r.number < current.number and r.serving_since is not None and r.state != "aborted"
        ]
        if not earlier:
            raise UsageError(
                f"{current.name} is the first release of {env!r}: nothing to roll back to"
            )
        warm = [r for r in earlier if r.state == "warm"]
        return warm[-1] if warm else earlier[-1]

    def abort_env(self, env: str, who: str) -> Release:
        with self.lock:
            holder = self.state.lock_holder(env)
            if holder is None:
                raise UsageError(f"no release is in progress in {env!r}")
            release = self.state.release(holder)
            self.abort(release, f"aborted by {who}")
            return self.state.release(release.id)

    def stop_all(self) -> None:
        """Take everything in this home down: instances, then the router."""
        with self.lock:
            for release in self.state.releases(
                states=("starting", "switching", "serving", "warm", "retiring")
            ):
                self.state.update_release(
                    release.id, state="stopped", weight=0, finished=time.time()
                )
            futures = []
            for inst in self.state.instances(states=LIVE_INSTANCE):
                handle = self.handles.pop(inst.id, None)
                self.state.update_instance(
                    inst.id,
                    state="stopped",
                    in_rotation=False,
                    stopped_at=time.time(),
                    exit_reason="kiln daemon stop --all",
                )
                if handle is not None:
                    futures.append(self.workers.submit(self.runtime.stop, handle, 2.0))
            for fut in futures:
                fut.result()
            for stray in self.runtime.find(self.home.rootfs):
                self.runtime.stop(stray, 1.0)
            if self.router.is_running():
                self.router.shutdown(drain=1.0)
            self.state.event("daemon.stopped", "everything stopped (kiln daemon stop --all)")

    # -- views -------------------------------------------------------------
    def release_view(self, release: Release) -> dict[str, Any]:
        out = release.to_json()
        out["canary"] = self.canary_live(release) if release.state in ACTIVE_RELEASE else None
        out["instances"] = [i.to_json() for i in self.state.instances(release_id=release.id)]
        for inst in out["instances"]:
            if inst["state"] == "failed":
                inst["log_tail"] = self.log_tail(inst["id"])
        return out

    def status(self, env: str | None = None) -> dict[str, Any]:
        now = time.time()
        envs = []
        for name in self.state.envs():
            if env is not None and name != env:
                continue
            live = self.state.releases(
                env=name, states=("starting", "switching", "serving", "warm", "retiring")
            )
            releases = []
            for r in live:
                view = r.to_json()
                view["instances"] = [
                    {**i.to_json(), "uptime": round(now - i.created, 1)}
                    for i in self.state.instances(release_id=r.id, states=LIVE_INSTANCE)
                ]
                releases.append(view)
            listen = next((r.spec["listen"] for r in reversed(live)), None)
            envs.append(
                {
                    "env": name,
                    "listen": listen,
                    "url": f"http://{listen}/" if listen else None,
                    "releases": releases,
                }
            )
        if env is not None and not envs:
            raise UsageError(
                f"no environment {env!r} has had a release yet", hint="see 'kiln status'"
            )
        return {"envs": envs}


def _probe(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", path, headers={"User-Agent": "kiln-health"})
        status = conn.getresponse().status
        return 200 <= status < 300
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
