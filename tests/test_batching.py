"""Adaptive batch sizing (core/foundation/batching) and the sweep driven by it."""

import pytest

from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.foundation.batching import AdaptiveBatch
from kms_pipelines.core.keys import lifecycle
from tests.test_envelope import KEY, assert_all_decrypt, fill, versions_of


def test_size_moves_towards_the_target_at_most_doubling_or_halving():
    b = AdaptiveBatch(1000, target_seconds=0.25, min_size=100, max_size=20_000)
    b.observe(1000, 0.05)  # 5x faster than the target: doubles, not 5x
    assert b.size == 2000
    b.observe(2000, 0.2)  # close to the target: proportional
    assert b.size == 2500
    b.observe(2500, 10.0)  # one very slow commit: halves, not /40
    assert b.size == 1250
    for _ in range(20):
        b.observe(b.size, 0.001)
    assert b.size == 20_000  # capped: memory stays bounded whatever n is
    for _ in range(20):
        b.observe(b.size, b.size * 0.01)  # slow in proportion to the rows: shrinks
    assert b.size == 100  # floored


def test_commits_slow_whatever_their_size_make_batches_grow_not_shrink():
    """A loaded server where every commit waits ~0.3 s (WAL flush, lock waits) beyond a tiny
    per-row cost: halving towards a 0.25 s target would only multiply the commits."""
    b = AdaptiveBatch(1000, target_seconds=0.25, min_size=100, max_size=20_000)
    for _ in range(12):
        b.observe(b.size, 0.3 + b.size * 1e-6)
    assert b.size == 20_000 and min(b.history) >= 800  # one proportional step before two sizes are known
    assert b.fixed_seconds() == pytest.approx(0.3, abs=0.01)
    # and once the per-row part dominates again, it shrinks towards the target
    for _ in range(20):
        b.observe(b.size, b.size * 0.001)
    assert b.size == 250


def test_a_short_last_batch_or_no_target_leaves_the_size_alone():
    b = AdaptiveBatch(1000, target_seconds=0.25, max_size=5000)
    b.observe(10, 0.0001)
    assert b.size == 1000 and b.history == []
    fixed = AdaptiveBatch(1000, target_seconds=None, max_size=5000)
    fixed.observe(1000, 0.0001)
    assert fixed.size == 1000


def test_a_zero_start_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        AdaptiveBatch(0, target_seconds=1.0)


def test_adaptive_sweep_grows_its_batches_and_moves_everything(kms):
    objects = fill(kms, 70)
    lifecycle.rotate(kms, KEY)
    seen = []
    # a target far above any commit time here: every full batch doubles, up to the cap
    result = envelope.sweep(kms, KEY, batch_size=2, batch_target_seconds=30.0, max_batch_size=16, progress=seen.append)
    sizes = [p.moved for p in seen]
    assert (result.moved, result.remaining, result.failed) == (70, 0, 0)
    assert sum(sizes) == 70 and max(sizes) == 16 and sizes[0] == 2
    assert sizes == sorted(sizes[:-1]) + [sizes[-1]]  # non-decreasing until the short last batch
    assert versions_of(kms) == {2: 70}
    assert_all_decrypt(kms, objects)


def test_policy_batching_comes_from_policy_yaml(kms):
    p = kms.policy.envelope
    assert envelope.policy_batching(kms) == {
        "batch_size": p.batch_size,
        "batch_target_seconds": p.batch_target_commit_ms / 1000,
        "max_batch_size": p.batch_size_max,
    }


def test_a_pipelined_caller_grows_the_size_at_every_commit():
    """The sweep reads batch k+1 before batch k's commit is observed. Judged against the size
    current at observation, that batch looked short and was ignored: sizes went 1000, 1000,
    2000, 2000, 4000, 4000, … (eight commits to reach 16,000 at 100k DEKs)."""
    b = AdaptiveBatch(1000, target_seconds=0.25, min_size=100, max_size=20_000)
    in_flight = b.size  # read before any commit was observed
    read = [in_flight]
    for _ in range(5):
        next_read = b.size  # the next batch is read while ``in_flight`` commits
        read.append(next_read)
        b.observe(in_flight, 0.02 + in_flight * 1e-5, requested=in_flight)  # far below the target
        in_flight = next_read
    assert read == [1000, 1000, 2000, 4000, 8000, 16_000]
    # never past what the observed rate reaches: 1000 rows in 0.2 s predicts 1250 for 0.25 s
    slow = AdaptiveBatch(1000, target_seconds=0.25, max_size=20_000)
    slow.observe(1000, 0.05)
    slow.observe(1000, 0.2, requested=1000)
    assert slow.size == 1250
