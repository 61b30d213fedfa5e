"""Selection and counting, as plain data (no sockets)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.router.config import InvalidConfig, RouterConfig, load_state, save_state
from kiln.router.pools import Balancer, Histogram, Pool, ReleaseStats


@dataclass(eq=False)
class Member:
    name: str
    in_flight: int = 0
    down_until: float = 0.0


def test_smooth_weighted_round_robin_is_exact_and_interleaved() -> None:
    pools = [Pool("a", 5, [Member("a")]), Pool("b", 1, [Member("b")]), Pool("c", 0, [Member("c")])]
    balancer = Balancer(pools)
    picks = [p.release for p in (balancer.choose() for _ in range(600)) if p is not None]
    assert Counter(picks) == {"a": 500, "b": 100}
    # Spread out, not 500 a's then 100 b's.
    assert all("b" in picks[i : i + 6] for i in range(0, 600, 6))


def test_no_weight_means_no_choice() -> None:
    assert Balancer([Pool("a", 0, [Member("a")])]).choose() is None
    assert Balancer([]).choose() is None


def test_pick_prefers_fewest_in_flight_and_rotates_ties() -> None:
    members = [Member("x"), Member("y"), Member("z")]
    pool = Pool("r", 1, members)
    members[0].in_flight = 3
    members[1].in_flight = 1
    members[2].in_flight = 1
    chosen = Counter(pool.pick(0.0).name for _ in range(10))  # type: ignore[union-attr]
    assert set(chosen) == {"y", "z"}


def test_pick_skips_down_and_excluded_members_unless_nothing_else() -> None:
    up, down = Member("up"), Member("down", down_until=10.0)
    pool = Pool("r", 1, [down, up])
    assert {pool.pick(5.0).name for _ in range(4)} == {"up"}  # type: ignore[union-attr]
    assert pool.pick(5.0, [up]) is None
    assert pool.pick(5.0, [up], allow_down=True) is down
    assert pool.pick(11.0, [up]) is down  # down only for a while
    assert Pool("r", 1, [down]).pick(5.0) is None
    assert Pool("r", 1, []).pick(5.0) is None


def test_histogram_is_cumulative_like_prometheus() -> None:
    hist = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(value)
    assert hist.to_json() == {
        "buckets": {"0.1": 2, "1": 3, "+Inf": 4},
        "count": 4,
        "sum": 3.65,
    }


def test_release_stats_by_status_class() -> None:
    stats = ReleaseStats()
    for status in (200, 204, 301, 404, 500, 503, 99, 600):
        stats.record(status, 0.01)
    assert stats.requests_json() == {"2xx": 2, "3xx": 1, "4xx": 1, "5xx": 4, "failed": 0}


GOOD = {
    "generation": 7,
    "envs": {
        "production": {
            "listen": "127.0.0.1:8080",
            "sticky": True,
            "pools": [
                {
                    "release": "r3",
                    "weight": 90,
                    "instances": [{"id": "i-abc", "addr": "127.0.0.1:41234"}],
                },
                {"release": "r4", "weight": 10, "instances": []},
            ],
        },
        "v6": {"listen": "[::1]:8081", "pools": []},
    },
}


def test_config_round_trips() -> None:
    config = RouterConfig.from_json(GOOD)
    again = RouterConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again == config
    assert config.to_json()["envs"]["v6"] == {"listen": "[::1]:8081", "sticky": False, "pools": []}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(generation="1"), "generation"),
        (lambda c: c.update(extra=1), "unknown key 'extra'"),
        (lambda c: c["envs"]["production"].update(listen="localhost:80"), "not an IP"),
        (lambda c: c["envs"]["production"].update(listen="127.0.0.1:0"), "bad port"),
        (lambda c: c["envs"]["production"]["pools"][0].update(weight=-1), "weight"),
        (lambda c: c["envs"]["production"]["pools"][0].update(weight=True), "weight"),
        (lambda c: c["envs"]["production"]["pools"][1].update(release="r3"), "appears twice"),
        (lambda c: c["envs"]["production"]["pools"][0].update(release="r 3"), "release"),
        (lambda c: c["envs"]["v6"].update(listen="[::1]:8080", sticky="yes"), "sticky"),
        (lambda c: c["envs"].update({"bad name": {"listen": "127.0.0.1:1"}}), "environment name"),
        (
            lambda c: c["envs"]["production"]["pools"][1]["instances"].append(
                {"id": "i-abc", "addr": "127.0.0.1:1"}
            ),
            "appears twice",
        ),
        (lambda c: c["envs"]["v6"].update(listen="127.0.0.1:8080"), "also used by"),
    ],
)
def test_config_errors_name_the_field(change: object, message: str) -> None:
    data = json.loads(json.dumps(GOOD))
    change(data)  # type: ignore[operator]
    with pytest.raises(InvalidConfig, match=message):
        RouterConfig.from_json(data)


def test_state_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "state" / "router.json"
    assert load_state(path) is None
    config = RouterConfig.from_json(GOOD)
    save_state(path, config)
    assert load_state(path) == config
    save_state(path, RouterConfig.empty())
    assert load_state(path) == RouterConfig.empty()
    assert [p.name for p in path.parent.iterdir()] == ["router.json"]  # no temp files left
    path.write_text("{not json")
    with pytest.raises(InvalidConfig, match="state file"):
        load_state(path)
