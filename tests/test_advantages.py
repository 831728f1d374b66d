"""Per-(prompt, taste) advantage normalisation with a taste or batch fallback for rare keys."""

import numpy as np
import pytest

from plural_diffusion.advantages import PerKeyStatTracker


def test_each_key_is_normalised_by_its_own_statistics():
    tracker = PerKeyStatTracker(buffer_size=100, min_count=2)
    # key 0 rewarded on a scale 100x key 1's: after normalisation both look alike
    keys = np.array([0, 0, 0, 1, 1, 1])
    rewards = np.array([100.0, 200.0, 300.0, 1.0, 2.0, 3.0])
    adv = tracker.update(keys, rewards)
    assert adv[:3] == pytest.approx(adv[3:], abs=1e-4)
    assert adv[:3] == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-3)


def test_rare_keys_fall_back_to_the_batch_statistics():
    tracker = PerKeyStatTracker(buffer_size=100, min_count=3)
    keys = np.array([0, 0, 0, 0, 7])
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    adv = tracker.update(keys, rewards)
    batch_mean, batch_std = rewards.mean(), rewards.std()
    assert adv[4] == pytest.approx((10.0 - batch_mean) / batch_std, rel=1e-4)


def test_rare_keys_fall_back_to_their_groups_statistics_before_the_batchs():
    """Two tastes on scales 10x apart, two images per (prompt, taste) key: against the whole
    batch every image of the low-scored taste would get a negative advantage; against its own
    taste's rewards its better images are positive."""
    tracker = PerKeyStatTracker(buffer_size=100, min_count=4)
    keys = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # key = (prompt, taste); two prompts
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # the taste
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])
    batch = PerKeyStatTracker(buffer_size=100, min_count=4).update(keys, rewards)
    assert (batch[:4] < 0).all()
    adv = tracker.update(keys, rewards, groups)
    np.testing.assert_allclose(adv[:4], (rewards[:4] - 2.5) / np.std(rewards[:4]), rtol=1e-5)
    np.testing.assert_allclose(adv[:4], adv[4:], rtol=1e-5)
    # a group seen too rarely itself uses the batch's statistics
    lone = PerKeyStatTracker(buffer_size=100, min_count=4)
    adv = lone.update(
        np.array([0, 0, 0, 0, 5]), np.array([1.0, 2.0, 3.0, 4.0, 10.0]), np.array([0, 0, 0, 0, 1])
    )
    r = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    assert adv[4] == pytest.approx((10.0 - r.mean()) / r.std(), rel=1e-4)


def test_history_carries_over_epochs_and_round_trips():
    tracker = PerKeyStatTracker(buffer_size=4, min_count=1)
    tracker.update(np.array([3, 3]), np.array([0.0, 2.0]))
    adv = tracker.update(np.array([3]), np.array([2.0]))  # history now [0, 2, 2]
    assert adv[0] == pytest.approx((2 - 4 / 3) / np.std([0, 2, 2]), rel=1e-4)
    clone = PerKeyStatTracker(buffer_size=4, min_count=1)
    clone.load_state_dict(tracker.state_dict())
    assert clone.update(np.array([3]), np.array([1.0])) == pytest.approx(
        tracker.update(np.array([3]), np.array([1.0]))
    )
    grouped = PerKeyStatTracker(buffer_size=4, min_count=3)
    grouped.update(np.array([1, 2]), np.array([0.0, 2.0]), np.array([0, 0]))
    clone = PerKeyStatTracker(buffer_size=4, min_count=3)
    clone.load_state_dict(grouped.state_dict())
    assert clone.update(np.array([1]), np.array([3.0]), np.array([0])) == pytest.approx(
        grouped.update(np.array([1]), np.array([3.0]), np.array([0]))
    )


def test_a_checkpoint_from_before_the_group_fallback_still_loads():
    tracker = PerKeyStatTracker(buffer_size=4, min_count=1)
    tracker.load_state_dict({"3": [0.0, 2.0]})  # the old format: keys only
    assert list(tracker.history[3]) == [0.0, 2.0] and not tracker.group_history


def test_non_finite_rewards_are_refused():
    with pytest.raises(FloatingPointError):
        PerKeyStatTracker().update(np.array([0, 1]), np.array([1.0, np.nan]))


def test_observe_gives_the_statistics_update_normalises_with():
    keys = np.array([0, 0, 0, 1, 1, 1])
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 30.0, 50.0])
    a, b = PerKeyStatTracker(min_count=3), PerKeyStatTracker(min_count=3)
    mean, std = a.observe(keys, rewards)
    np.testing.assert_allclose(mean, [2, 2, 2, 30, 30, 30])
    np.testing.assert_allclose(std[[0, 3]], [np.std([1, 2, 3]), np.std([10, 30, 50])], rtol=1e-5)
    np.testing.assert_allclose(b.update(keys, rewards), (rewards - mean) / std)


def test_a_forgotten_key_and_group_start_their_history_afresh():
    """What a restarted taste needs: against its old, lower history every new reward would be
    above the mean; forgotten, its rewards are centred on themselves, and the others keep
    theirs."""
    tracker = PerKeyStatTracker(buffer_size=100, min_count=2)
    keys, groups = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])
    tracker.update(keys, np.array([1.0, 2.0, 5.0, 6.0]), groups)
    stale = PerKeyStatTracker(buffer_size=100, min_count=2)
    stale.load_state_dict(tracker.state_dict())
    tracker.forget([0], [0])
    assert 0 not in tracker.history and 0 not in tracker.group_history
    new = np.array([8.0, 9.0, 5.0, 6.0])
    fresh, old = tracker.update(keys, new, groups), stale.update(keys, new, groups)
    assert (old[:2] > 0).all()  # the stale history: both images reinforced
    np.testing.assert_allclose(fresh[:2], [-1.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(fresh[2:], old[2:])  # key 1 untouched
    tracker.forget([42], [42])  # unknown keys: nothing to drop
