"""Advantages for DDPO: rewards normalised per (prompt, taste) key, with fallbacks.

As in DDPO's per-prompt stat tracker: each key keeps a short history of its rewards, and a
sample's advantage is (reward - key mean) / key std. Keys seen too rarely (fewer than
`min_count` rewards) use the statistics of the whole batch instead or, given groups, of their
group (the taste, over every prompt; a group seen too rarely, the batch's), so a rare key never
divides by the std of one sample. Keying on the taste as well as the prompt matters here: tastes
are rewarded by different heads on different scales, and a key per (prompt, taste) compares an
image only with others asked for the same thing. The group fallback keeps that in the first
epochs: against the whole batch, every image of a taste whose head scores low gets a negative
advantage, and its expert is pushed away from all its own samples at once.
"""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np


class PerKeyStatTracker:
    def __init__(self, buffer_size: int = 64, min_count: int = 8, eps: float = 1e-6):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self.history: dict[int, deque] = defaultdict(lambda: deque(maxlen=buffer_size))
        self.group_history: dict[int, deque] = defaultdict(lambda: deque(maxlen=buffer_size))

    def update(
        self, keys: np.ndarray, rewards: np.ndarray, groups: np.ndarray | None = None
    ) -> np.ndarray:
        """Advantages [N] for rewards [N] of samples with integer keys [N]; updates the history.

        Pass the keys and rewards of *all* processes (gathered), so every rank normalises with
        the same statistics.
        """
        mean, std = self.observe(keys, rewards, groups)
        return (np.asarray(rewards, dtype=np.float64) - mean) / std

    def observe(
        self, keys: np.ndarray, rewards: np.ndarray, groups: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Add rewards [N] to their keys' (and groups') histories; return each sample's (mean,
        std) [N] as `update` normalises with them (what reward backpropagation divides by).
        `groups` [N]: each key's group, constant within a key; None = no group fallback."""
        keys = np.asarray(keys)
        rewards = np.asarray(rewards, dtype=np.float64)
        assert keys.shape == rewards.shape and rewards.ndim == 1, (keys.shape, rewards.shape)
        if not np.isfinite(rewards).all():
            raise FloatingPointError("non-finite reward passed to the stat tracker")
        fallback = {None: (rewards.mean(), rewards.std() + self.eps)}
        if groups is not None:
            groups = np.asarray(groups)
            assert groups.shape == keys.shape, (groups.shape, keys.shape)
            for group in np.unique(groups):
                self.group_history[int(group)].extend(rewards[groups == group].tolist())
                seen = np.asarray(self.group_history[int(group)])
                if len(seen) >= self.min_count:
                    fallback[int(group)] = (seen.mean(), seen.std() + self.eps)
        mean, std = np.empty_like(rewards), np.empty_like(rewards)
        for key in np.unique(keys):
            mask = keys == key
            self.history[int(key)].extend(rewards[mask].tolist())
            seen = np.asarray(self.history[int(key)])
            if len(seen) >= self.min_count:
                mean[mask], std[mask] = seen.mean(), seen.std() + self.eps
            else:
                group = None if groups is None else int(groups[mask][0])
                mean[mask], std[mask] = fallback.get(group, fallback[None])
        return mean, std

    def forget(self, keys, groups=()) -> None:
        """Drop the history of `keys` and `groups`: their next rewards start it afresh (fewer
        than `min_count` fall back to their group's, then the batch's, as at the start)."""
        for key in keys:
            self.history.pop(int(key), None)
        for group in groups:
            self.group_history.pop(int(group), None)

    def state_dict(self) -> dict:
        return {
            "keys": {str(k): list(v) for k, v in self.history.items()},
            "groups": {str(k): list(v) for k, v in self.group_history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if "keys" not in state:  # a checkpoint from before the group fallback: keys only
            state = {"keys": state, "groups": {}}
        for history, saved in (
            (self.history, state["keys"]),
            (self.group_history, state["groups"]),
        ):
            history.clear()
            for k, v in saved.items():
                history[int(k)].extend(v)
