"""Per-taste checkpoint selection for taste-routed LoRA experts.

Reward backpropagation through the last denoising step follows a truncated gradient: it can
walk one taste's expert past its best and keep it there. Measured on the toy base of seed 14
(the demo's matched policy, 16 held-out images per checkpoint): vivid's own head scored its
held-out images 8.37 at epoch 8 and 7.88 at the last epoch, while the other tastes' images kept
improving; vivid's held-out gold is 0.53 with epoch 8's expert and 0.34 without
(`benchmarks/draft_options_toy.py --base-seed 14 "seed=14" "seed=14 save_every=4"`). The experts make a per-taste early stop
possible: each taste keeps the expert block of the checkpoint where *its own head* scored its
held-out images highest, beside the last epoch's shared block (with per-taste modules,
`conditioning.expert_tokens`, the taste's module comes from the same checkpoint as its block;
a shared module stays the last epoch's). Gold is never seen; the images are drawn from fixed
prompts and noise that training does not use, the same for every candidate, so candidates
differ only by their weights. A checkpoint replaces
the last epoch's expert only when it beats it by `select_min_gain` of the taste's gain over the
base model (`pick_best`). With `select_looks`, a taste may give up a share of its best gain for
a checkpoint whose held-out images are more varied (`pick_varied`).

A LoRA of rank E * r holds E blocks of rank r (`plural_diffusion.experts`): block e is rows
e*r:(e+1)*r of each `lora_A` weight and the same columns of each `lora_B` weight.
"""

from __future__ import annotations

import torch


def with_expert_block(
    state: dict[str, torch.Tensor], source: dict[str, torch.Tensor], expert: int, rank: int
) -> dict[str, torch.Tensor]:
    """`state` with expert block `expert` (of `rank`) taken from `source`; both are LoRA state
    dicts with peft's key names and the same shapes. The other blocks are `state`'s."""
    rows = slice(expert * rank, (expert + 1) * rank)
    out = {}
    for key, value in state.items():
        if source[key].shape != value.shape:
            raise ValueError(f"{key}: shapes {tuple(source[key].shape)} and {tuple(value.shape)}")
        if ".lora_A." in key:
            value = value.clone()
            value[rows] = source[key][rows]
        elif ".lora_B." in key:
            value = value.clone()
            value[:, rows] = source[key][:, rows]
        out[key] = value
    return out


def pick_best(scores: dict[str, float], keep: str, base: float, min_gain: float) -> str:
    """The candidate to use: the highest-scoring one if it beats `keep` (the last epoch's) by
    at least `min_gain` times the last epoch's gain over the base model (`base`), else `keep`.

    The heads are least sure near the top of their range: on the toy world, candidates within
    a few hundredths of the last epoch's score had gold on either side of it. The margin keeps
    the last epoch unless a checkpoint is better by a share of all the taste gained.
    """
    best = max(scores, key=lambda name: (scores[name], name == keep))
    margin = min_gain * max(scores[keep] - base, 0.0)
    return best if scores[best] > scores[keep] + margin else keep


# Vendi scores within a tenth of a look of each other count as equally varied (16 images of one
# look score 1.00-1.05): no reward is given up for less
LOOKS_RESOLUTION = 0.1


def pick_varied(
    scores: dict[str, float],
    variety: dict[str, float],
    keep: str,
    base: float,
    min_gain: float,
    looks: float,
) -> str:
    """`pick_best`, unless a candidate whose held-out images are more varied (`variety`, e.g.
    their Vendi score) stays within `looks` times the best candidate's gain over the base
    model: then the most varied of those. `looks` 0: `pick_best`.

    Reward backpropagation collapses a taste's images into one look on the way to its top, and
    the last hundredths of reward cost most of the looks. Measured on the toy base of seed 0
    (the demo's matched policy, 16 evaluation images per taste): noir's images had gold .955
    and Vendi 1.96 at epoch 7, gold .970 and Vendi 1.12 at epoch 20; the base model's Vendi is
    2.56. A taste gives up at most that share of its gain for its looks, and only where its own
    head scores the two nearly alike. Candidates within `LOOKS_RESOLUTION` of the most varied
    one count as varied as it: of those, `pick_best`'s choice if it is one, else the
    highest-scoring.
    """
    choice = pick_best(scores, keep, base, min_gain)
    if looks <= 0:
        return choice
    top = max(scores.values())
    near = [name for name in scores if scores[name] >= top - looks * max(top - base, 0.0)]
    most = max(variety[name] for name in near)
    varied = [name for name in near if variety[name] >= most - LOOKS_RESOLUTION]
    return choice if choice in varied else max(varied, key=scores.__getitem__)


def lagging_experts(
    scores: list[list[float]],
    base: list[float],
    ratio: float,
    spread: list[float] | None = None,
    min_gap: float = 0.0,
) -> dict[int, int]:
    """Which taste restarts from which: {k: j} where taste k's own held-out images gain less over
    the base model's, on k's head, than `ratio` times what taste j's images gain there (j the
    taste whose images k's head scores highest, and only if they gain at all), and j's images
    lead k's own by at least `min_gap` times `spread[k]` (k's head's own scale).

    scores[j][k]: taste k's head on the images made for taste j (rows: made for; columns:
    scored by); base[k]: taste k's head on the base model's images of the same draws.
    Measured on the toy base of seed 5 (4 epochs in): vivid's expert had gone dark with noir's
    (its head 2.23 on its own images, 1.64 on the base's) while sunny's images scored 5.10 on
    vivid's head; left alone it climbed to 5.5 (gold .32) where sunny's images reached 8.
    The gap keeps noise from restarting an expert that has barely moved: on the all-bright base
    of seed 1, two epochs in, noir's head put vivid's images 0.17 above noir's own (its spread
    over the rated images is 1.98).
    """
    restarts = {}
    for k in range(len(base)):
        others = [j for j in range(len(base)) if j != k]
        if not others:
            continue
        j = max(others, key=lambda j: scores[j][k])
        gain = scores[j][k] - base[k]
        lead = scores[j][k] - scores[k][k]
        wide = spread is None or lead >= min_gap * spread[k]
        if gain > 0 and scores[k][k] - base[k] < ratio * gain and wide:
            restarts[k] = j
    return restarts


@torch.no_grad()
def copy_expert_block(
    tensors: list[tuple[str, torch.Tensor]], restarts: dict[int, int], rank: int
) -> None:
    """In place, for each (kind, tensor) with kind "A" (a `lora_A` weight or a same-shaped
    optimizer moment: blocks are row ranges) or "B" (`lora_B`: column ranges): block k becomes
    a copy of block j for each k: j in `restarts`, all read before any is written (two
    tastes may swap)."""
    for kind, tensor in tensors:
        view = tensor if kind == "A" else tensor.transpose(0, 1)
        sources = {j: view[j * rank : (j + 1) * rank].clone() for j in set(restarts.values())}
        for k, j in restarts.items():
            view[k * rank : (k + 1) * rank] = sources[j]
