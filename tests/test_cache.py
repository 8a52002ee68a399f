"""Neuron cache policies (csrc/ripple_cache.c) through the C test harness (a library of its own,
csrc/ripple_cache_test.h): crafted sequences with known answers, a plain-Python reference of each
documented policy replayed op by op, the linking admission rate, the byte budget and the bytes
handed back after churn."""
from __future__ import annotations

import random
from collections import OrderedDict, deque

import pytest

from ripple_gguf import _native
from ripple_gguf.binding import CACHE_POLICIES

ffi, lib = _native.cache_test_library()
LRU, S3FIFO, LINKING, PINNED = (CACHE_POLICIES[p] for p in ("lru", "s3fifo", "linking", "pinned"))
POLICIES = (LRU, S3FIFO, LINKING)
SMALL, MAIN, GHOST, ABSENT = 0, 1, 2, -1
BS = 48  # bytes per bundle


class Cache:
    """Owning wrapper of ripple_cache_test_* (one fake model of len(n_ff) layers)."""

    def __init__(self, n_ff, slots, policy, bundle_size=BS, budget=None):
        self.n_ff = list(n_ff)
        ff = ffi.new("int32_t[]", self.n_ff)
        b = slots * bundle_size if budget is None else budget
        self.h = lib.ripple_cache_test_new(len(self.n_ff), ff, bundle_size, b, policy)
        assert self.h != ffi.NULL

    def get(self, pos, layer=0):
        r = lib.ripple_cache_test_get(self.h, layer, pos)
        assert r in (0, 1), f"bundle ({layer}, {pos}) came back with wrong bytes ({r})"
        return r == 1

    def put(self, pos, run=1, layer=0):
        lib.ripple_cache_test_put(self.h, layer, pos, run)

    def where(self, pos, layer=0):
        return lib.ripple_cache_test_where(self.h, layer, pos)

    def access(self, pos, run=1, layer=0):
        """What the flash store does: a get, and a put on a miss."""
        if self.get(pos, layer):
            return True
        self.put(pos, run, layer)
        return False

    @property
    def capacity(self):
        return lib.ripple_cache_test_capacity(self.h)

    @property
    def used_bytes(self):
        return lib.ripple_cache_test_used_bytes(self.h)

    def close(self):
        if self.h is not None:
            lib.ripple_cache_test_free(self.h)
            self.h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- plain references of the documented policies (test oracles) ----

class RefLRU:
    def __init__(self, n):
        self.n, self.q = n, OrderedDict()

    def get(self, k):
        if k in self.q:
            self.q.move_to_end(k)
            return True
        return False

    def put(self, k, run=1):
        if k in self.q:
            return
        if len(self.q) == self.n:
            self.q.popitem(last=False)
        self.q[k] = None

    def where(self, k):
        return MAIN if k in self.q else ABSENT


def xorshift64(x):
    m = (1 << 64) - 1
    x ^= (x << 13) & m
    x ^= x >> 7
    x ^= (x << 17) & m
    return x


class RefS3FIFO:
    """Small FIFO of max(1, n // 10), main CLOCK with a count capped at 3, ghost FIFO of as many
    keys as main holds (a ghost found again leaves a hole, it does not shift the others)."""

    def __init__(self, n, linking=False):
        self.n, self.linking = n, linking
        self.small_cap = max(1, n // 10)
        self.small, self.main = deque(), deque()  # left = newest
        self.ghost = deque(maxlen=n - self.small_cap)
        self.freq = {}
        self.rng = 0x9E3779B97F4A7C15

    def get(self, k):
        if k in self.freq:
            self.freq[k] = min(self.freq[k] + 1, 3)
            return True
        return False

    def _evict(self):
        if len(self.small) >= self.small_cap or not self.main:
            while self.small:
                t = self.small.pop()
                if self.freq[t] > 0:
                    self.freq[t] = 0
                    self.main.appendleft(t)
                    continue
                del self.freq[t]
                if self.ghost.maxlen:
                    self.ghost.append(t)
                return
        while True:
            t = self.main.pop()
            if self.freq[t] == 0:
                del self.freq[t]
                return
            self.freq[t] -= 1
            self.main.appendleft(t)

    def put(self, k, run=1):
        if k in self.freq:
            return
        if k in self.ghost:
            self.ghost[self.ghost.index(k)] = None
            q = self.main
        else:
            if self.linking and run > 1:
                self.rng = xorshift64(self.rng)
                if self.rng % run != 0:
                    return
            q = self.small
        if len(self.freq) == self.n:
            self._evict()
        self.freq[k] = 0
        q.appendleft(k)

    def where(self, k):
        if k in self.freq:
            return MAIN if k in self.main else SMALL
        return GHOST if k in self.ghost else ABSENT


def reference(policy, n):
    return RefLRU(n) if policy == LRU else RefS3FIFO(n, linking=policy == LINKING)


# ---- crafted sequences ----

def test_lru_evicts_least_recently_used():
    with Cache([16], 3, LRU) as c:
        for k in (0, 1, 2):
            c.put(k)
        assert c.get(0)
        c.put(3)  # evicts 1, the least recently used
        assert [c.where(k) for k in range(4)] == [MAIN, ABSENT, MAIN, MAIN]
        c.put(4)  # then 2
        assert [c.where(k) for k in range(5)] == [MAIN, ABSENT, ABSENT, MAIN, MAIN]
        assert c.get(0) and c.get(3) and c.get(4) and not c.get(1) and not c.get(2)


def test_s3fifo_one_hit_wonders_leave_through_small():
    with Cache([1000], 10, S3FIFO) as c, Cache([1000], 10, LRU) as lru:
        for x in (c, lru):
            for k in range(10):
                x.put(k)
            for k in range(5):
                assert x.get(k)
            for k in range(100, 300):  # a scan of bundles used once
                x.access(k)
        # the bundles hit while in small were promoted and survive the scan in main
        assert [c.where(k) for k in range(5)] == [MAIN] * 5
        assert all(c.where(k) in (SMALL, GHOST, ABSENT) for k in range(100, 300))
        # small holds the slots main does not use: the newest five of the scan
        assert [k for k in range(100, 300) if c.where(k) == SMALL] == list(range(295, 300))
        # LRU lost them all to the scan
        assert all(lru.where(k) == ABSENT for k in range(10))


def test_s3fifo_promotes_re_referenced_and_ghost_hit_goes_to_main():
    with Cache([1000], 10, S3FIFO) as c:
        for k in range(10):
            c.put(k)  # filling: everything enters small
        assert [c.where(k) for k in range(10)] == [SMALL] * 10
        assert c.get(0) and c.get(1)
        c.put(10)  # small's tail 0 and 1 were hit: promoted; 2 was not: evicted to the ghost
        assert c.where(0) == MAIN and c.where(1) == MAIN
        assert c.where(2) == GHOST and c.where(10) == SMALL
        c.put(2)  # found in the ghost: straight to main
        assert c.where(2) == MAIN
        assert c.get(2)


def test_s3fifo_main_is_a_clock_with_a_two_bit_count():
    with Cache([1000], 10, S3FIFO) as c:
        for k in range(10):
            c.put(k)
        for k in range(9):
            c.get(k)
        c.put(10)  # 0..8 promoted (counts cleared), 9 evicted to the ghost
        assert [c.where(k) for k in range(9)] == [MAIN] * 9
        for _ in range(5):
            c.get(0)  # count capped at 3: survives three turns of the clock, not four
        evicted = []
        for k in range(100, 160):  # hit while in small: each is promoted, so main must evict
            c.put(k)
            c.get(k)
            evicted += [m for m in range(9) if c.where(m) == ABSENT and m not in evicted]
        assert evicted[:8] == list(range(1, 9)) and 0 in evicted  # 0 went last


# ---- every policy against its plain reference ----

@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("slots", [1, 7, 40])
def test_matches_reference(policy, slots):
    rnd = random.Random(1000 * policy + slots)
    n_ff = 120
    with Cache([n_ff], slots, policy) as c:
        ref = reference(policy, slots)
        hot = list(range(15))
        for _ in range(4000):
            k = rnd.choice(hot) if rnd.random() < 0.6 else rnd.randrange(n_ff)
            run = rnd.choice([1, 1, 2, 3, 8, 30])
            if rnd.random() < 0.5:
                assert c.get(k) == ref.get(k)
            else:
                c.put(k, run)
                ref.put(k, run)
            assert c.where(k) == ref.where(k)
        assert [c.where(k) for k in range(n_ff)] == [ref.where(k) for k in range(n_ff)]


# ---- linking admission ----

def test_linking_admits_isolated_bundles():
    with Cache([5000], 50, LINKING) as c:
        for k in range(5000):
            c.put(k, 1)
            assert c.where(k) == SMALL
            c.put(k, 0)  # treated as isolated too


@pytest.mark.parametrize("run", [2, 4, 16, 100])
def test_linking_admits_long_runs_with_probability_one_over_length(run):
    n = 20000
    with Cache([n], 10, LINKING) as c:
        admitted = 0
        for k in range(n):
            c.put(k, run)
            admitted += c.where(k) != ABSENT
    p = 1 / run
    assert abs(admitted / n - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_linking_is_deterministic_and_s3fifo_ignores_runs():
    def admitted(policy):
        with Cache([3000], 3000, policy) as c:
            for k in range(3000):
                c.put(k, 1 + k % 9)
            return [c.where(k) != ABSENT for k in range(3000)]

    first = admitted(LINKING)
    assert first == admitted(LINKING)
    assert 0 < sum(first) < 3000
    assert all(admitted(S3FIFO)) and all(admitted(LRU))


# ---- budget and bytes ----

@pytest.mark.parametrize("policy", POLICIES)
def test_budget_never_exceeded(policy):
    rnd = random.Random(policy)
    n_ff = [300, 50, 1000]
    for budget in (0, BS - 1, BS, BS + 1, 10 * BS - 1, 97 * BS + 13, 5000 * BS):
        with Cache(n_ff, 0, policy, budget=budget) as c:
            assert c.capacity * BS <= budget
            assert c.capacity == min(budget // BS, sum(n_ff))
            for _ in range(3000):
                layer = rnd.randrange(len(n_ff))
                c.access(rnd.randrange(n_ff[layer]), rnd.randint(1, 20), layer)
                assert c.used_bytes <= budget
            if c.capacity <= 100:
                assert c.used_bytes == c.capacity * BS  # full, and never above


def test_empty_cache_and_unknown_policy():
    for budget, policy in ((0, S3FIFO), (10 * BS, 7), (10 * BS, -1)):
        with Cache([10], 0, policy, budget=budget) as c:
            assert c.capacity == 0
            c.put(3)
            assert not c.get(3) and c.used_bytes == 0 and c.where(3) == ABSENT


@pytest.mark.parametrize("policy", POLICIES)
def test_bytes_survive_heavy_churn(policy):
    rnd = random.Random(7 + policy)
    n_ff = [500, 200, 800, 64]
    hits = 0
    with Cache(n_ff, 150, policy, bundle_size=1000) as c:
        for _ in range(30000):
            layer = rnd.randrange(len(n_ff))
            pos = min(int(rnd.paretovariate(1.2)) - 1, n_ff[layer] - 1)  # Zipf-like
            hits += c.access(pos, rnd.randint(1, 10), layer)  # asserts the bytes on every hit
    assert hits > 1000


def _pinned(n_ff, slots, freq=None):
    ff = ffi.new("int32_t[]", list(n_ff))
    fq = ffi.new("uint8_t[]", list(freq)) if freq is not None else ffi.NULL
    c = Cache.__new__(Cache)
    c.n_ff = list(n_ff)
    c.h = lib.ripple_cache_test_new_freq(len(n_ff), ff, fq, BS, slots * BS, PINNED)
    assert c.h != ffi.NULL
    return c


def test_pinned_keeps_the_most_frequent_and_never_evicts():
    # two layers of 8; frequencies flat over the layers in position order
    freq = [0, 200, 5, 255, 7, 7, 7, 1,
            90, 0, 7, 0, 0, 300 % 256, 0, 0]
    c = _pinned([8, 8], 5, freq)
    # the 5 most frequent: 255 (0,3), 200 (0,1), 90 (1,0), 44 (1,5), then one of the three 7s of
    # layer 0... ties at the cut go by (layer, position): (0,4)
    keep = {(0, 3), (0, 1), (1, 0), (1, 5), (0, 4)}
    for _ in range(3):  # a cyclic scan: every bundle of every layer, three times
        for layer in (0, 1):
            for pos in range(8):
                if not c.get(pos, layer):
                    c.put(pos, layer=layer)
    held = {(l, p) for l in (0, 1) for p in range(8) if c.where(p, l) != ABSENT}
    assert held == keep
    assert all(c.get(p, l) for l, p in keep)  # bytes intact, still there
    assert lib.ripple_cache_test_used_bytes(c.h) == 5 * BS


def test_pinned_without_frequencies_keeps_the_first_bundles():
    c = _pinned([4, 4], 6)
    for pos in reversed(range(4)):  # the order of reads does not matter, only membership
        for layer in (1, 0):
            c.put(pos, layer=layer)
    held = {(l, p) for l in (0, 1) for p in range(4) if c.where(p, l) != ABSENT}
    assert held == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)}


def test_the_harness_is_not_in_the_runtime_library():
    """The runtime library exports none of the harness; the harness library exports it all."""
    import subprocess

    def exported(path):
        out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
        return {line.split()[-1] for line in out.stdout.splitlines() if line.split()[-2:-1] == ["T"]}

    runtime, harness = exported(_native.library_path), exported(_native._HERE / "_ripple_cache_test.so")
    assert not {s for s in runtime if s.startswith("ripple_cache")}
    assert {"ripple_cache_test_new", "ripple_cache_test_get", "ripple_cache_test_put"} <= harness

