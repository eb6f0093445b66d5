"""Each routing strategy gives the distribution it promises (seeded RNGs, no processes)."""

from __future__ import annotations

import collections
import random

import pytest

from servekit.proxy.config import STRATEGIES
from servekit.proxy.health import NodeHealth
from servekit.proxy.prefix_cache import PrefixIndex
from servekit.proxy.registry import Node
from servekit.proxy.requests import route_of
from servekit.proxy.sessions import SessionRing
from servekit.proxy.strategies import (
    CacheAware,
    LeastLoad,
    MinExpectedLatency,
    MinObservedLatency,
    PowerOfTwo,
    RandomStrategy,
    RoundRobin,
    Route,
    SessionAffinity,
    make_strategy,
)

ROUTE = Route(model="m")


def nodes(count: int, **kwargs: object) -> list[Node]:
    return [
        Node(f"http://n{i}", models=["m"], health=NodeHealth(healthy=True), **kwargs) for i in range(count)
    ]  # type: ignore[arg-type]


def counts(strategy: object, pool: list[Node], draws: int, route: Route = ROUTE) -> collections.Counter[str]:
    return collections.Counter(strategy.choose(pool, route).url for _ in range(draws))  # type: ignore[attr-defined]


def test_random_is_weighted_by_speed() -> None:
    pool = nodes(3)
    pool[0].speed, pool[1].speed, pool[2].speed = 1.0, 2.0, 5.0
    seen = counts(RandomStrategy(random.Random(0)), pool, 8000)
    assert seen["http://n2"] / seen["http://n0"] == pytest.approx(5.0, rel=0.15)
    assert seen["http://n1"] / seen["http://n0"] == pytest.approx(2.0, rel=0.15)


def test_random_without_speeds_is_uniform_and_missing_speed_is_the_average() -> None:
    seen = counts(RandomStrategy(random.Random(1)), nodes(4), 8000)
    assert all(1800 < seen[f"http://n{i}"] < 2200 for i in range(4))
    pool = nodes(2)
    pool[0].speed = 3.0  # n1 has none: it counts as the average, 3.0
    seen = counts(RandomStrategy(random.Random(2)), pool, 4000)
    assert seen["http://n0"] / seen["http://n1"] == pytest.approx(1.0, rel=0.1)


def test_min_expected_latency_divides_in_flight_by_speed() -> None:
    pool = nodes(2)
    pool[0].speed, pool[1].speed = 1.0, 4.0
    pool[0].in_flight, pool[1].in_flight = 1, 6  # (1+1)/1 = 2 vs (6+1)/4 = 1.75
    assert MinExpectedLatency(random.Random(0)).choose(pool, ROUTE).url == "http://n1"
    pool[1].in_flight = 8  # 9/4 > 2
    assert MinExpectedLatency(random.Random(0)).choose(pool, ROUTE).url == "http://n0"


def test_min_expected_latency_keeps_queues_proportional_to_speed() -> None:
    pool = nodes(2)
    pool[0].speed, pool[1].speed = 1.0, 3.0
    strategy = MinExpectedLatency(random.Random(0))
    for _ in range(40):  # requests that never finish: the queues fill in proportion to speed
        strategy.choose(pool, ROUTE).in_flight += 1
    assert (pool[0].in_flight, pool[1].in_flight) == (10, 30)


def test_min_observed_latency_prefers_fast_and_untried_nodes() -> None:
    pool = nodes(3)
    pool[0].latencies.extend([0.5, 0.7])
    pool[1].latencies.extend([0.1, 0.2])
    pool[2].latencies.extend([0.3])
    strategy = MinObservedLatency(random.Random(0))
    assert counts(strategy, pool, 50) == {"http://n1": 50}
    fresh = nodes(4)[3]
    assert strategy.choose([*pool, fresh], ROUTE) is fresh


def test_round_robin_cycles_in_url_order() -> None:
    pool = nodes(3)
    strategy = RoundRobin(random.Random(0))
    picked = [strategy.choose(list(reversed(pool)), ROUTE).url for _ in range(6)]
    assert picked == ["http://n0", "http://n1", "http://n2"] * 2


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    pool = nodes(3)
    for node, load in zip(pool, (0, 5, 10), strict=True):
        node.in_flight = load
    seen = counts(PowerOfTwo(random.Random(0)), pool, 3000)
    assert "http://n2" not in seen
    # the least loaded wins whenever it is drawn: 2 pairs out of 3
    assert seen["http://n0"] / 3000 == pytest.approx(2 / 3, abs=0.04)


def test_least_load_uses_reported_counts_and_in_flight() -> None:
    pool = nodes(3)
    pool[0].reported_load, pool[1].reported_load, pool[2].reported_load = 4, 1, 2
    assert counts(LeastLoad(random.Random(0)), pool, 20) == {"http://n1": 20}
    pool[1].in_flight = 5  # the proxy's own count is newer than the node's last report
    assert LeastLoad(random.Random(0)).choose(pool, ROUTE).url == "http://n2"
    even = counts(LeastLoad(random.Random(3)), nodes(2), 2000)
    assert 900 < even["http://n0"] < 1100  # ties are shared


def test_session_goes_to_one_node_and_removal_moves_only_its_sessions() -> None:
    pool = nodes(4)
    strategy = SessionAffinity(random.Random(0))
    sessions = [f"user-{i}" for i in range(400)]
    first = {s: strategy.choose(pool, Route(session=s)).url for s in sessions}
    assert {s: strategy.choose(pool, Route(session=s)).url for s in sessions} == first
    spread = collections.Counter(first.values())
    assert all(50 < spread[n.url] < 150 for n in pool)
    survivors = [n for n in pool if n.url != "http://n2"]
    strategy.forget("http://n2")
    after = {s: strategy.choose(survivors, Route(session=s)).url for s in sessions}
    moved = [s for s in sessions if after[s] != first[s]]
    assert moved and all(first[s] == "http://n2" for s in moved)


def test_session_load_is_bounded() -> None:
    pool = nodes(4)
    ring = SessionRing(load_factor=1.25)
    owner = ring.owner("hot", pool)
    for _ in range(40):  # one session's requests pile up: past the bound they spill to other nodes
        ring.choose("hot", pool).in_flight += 1
    capacity = -(-1.25 * 40 // 4)  # ceil(load_factor * total / nodes)
    assert max(n.in_flight for n in pool) <= capacity + 1
    assert owner.in_flight == max(n.in_flight for n in pool)
    for node in pool:
        node.in_flight = 0
    assert ring.choose("hot", pool) is owner  # back on its node once the load evens out


def test_session_without_a_key_goes_to_the_least_loaded() -> None:
    pool = nodes(3)
    pool[0].in_flight, pool[1].in_flight = 3, 1
    pool[2].in_flight = 2
    assert SessionAffinity(random.Random(0)).choose(pool, Route()).url == "http://n1"


def test_cache_aware_follows_the_prefix_and_falls_back_on_miss() -> None:
    pool = nodes(3)
    strategy = CacheAware(random.Random(0))
    system = "You are a helpful assistant who answers in French. " * 4
    home = strategy.choose(pool, Route(prompt=system + "question 1"))
    for i in range(2, 30):
        assert strategy.choose(pool, Route(prompt=system + f"question {i}")) is home
    home.in_flight = 2  # a miss goes to the least-loaded node, not the one with the largest tree
    other = strategy.choose(pool, Route(prompt="a completely different prompt, long enough to count"))
    assert other is not home


def test_cache_aware_spills_when_load_is_imbalanced() -> None:
    pool = nodes(2)
    strategy = CacheAware(random.Random(0), balance_abs=4, balance_rel=1.5)
    prompt = "shared system prompt " * 8
    home = strategy.choose(pool, Route(prompt=prompt))
    home.in_flight = 4  # within the absolute margin: the cache wins
    assert strategy.choose(pool, Route(prompt=prompt)) is home
    home.in_flight = 5  # 5 - 0 > 4 and 5 > 1.5 * 0: imbalanced
    spilled = strategy.choose(pool, Route(prompt=prompt))
    assert spilled is not home
    assert strategy.index.match(prompt, [spilled.url])[spilled.url] == len(prompt)  # now cached there too


def test_prefix_index_matches_leading_blocks_and_is_bounded() -> None:
    index = PrefixIndex(max_blocks=4)
    index.insert("a", "x" * 16 + "y" * 16 + "z" * 16)
    assert index.match("x" * 16 + "y" * 16 + "w" * 16, ["a", "b"]) == {"a": 32, "b": 0}
    index.insert("a", "q" * 64)
    assert index.size("a") == 4
    index.forget("a")
    assert index.match("q" * 64, ["a"]) == {"a": 0}


def test_make_strategy_knows_every_name() -> None:
    from servekit.proxy.config import STRATEGIES

    for name in STRATEGIES:
        assert make_strategy(name, random.Random(0)).choose(nodes(2), Route(session="s", prompt="p")).url


def test_only_cache_aware_reads_the_prompt_and_route_of_builds_it_only_then() -> None:
    users = [name for name in STRATEGIES if make_strategy(name, random.Random(0)).uses_prompt]
    assert users == ["cache_aware"]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "u1"}
    assert route_of(body, None) == Route(model="m", session="u1", prompt="<user>hi")
    assert route_of(body, "s", with_prompt=False) == Route(model="m", session="s", prompt="")
