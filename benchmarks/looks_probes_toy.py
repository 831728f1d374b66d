"""Three levers aimed at the matched policy's one look per taste, each a change to what the
trainer optimises, measured on held-out images before any of them becomes an option.

    python benchmarks/looks_probes_toy.py --base-seeds 0 3   (or one process per base seed)

Per toy base seed, the demo's matched policy (configs/toy.yaml, the demo's draws) is trained
once plainly and once per lever, and scored on 48 held-out images (16 per taste, fixed prompts
and noise, `draft_options_toy.held_out_images`): gold per taste, within-taste Vendi and the
cross-taste gold matrix (rows: made for; columns: scored by). The levers:

  constant paths   each taste reaches the UNet only through its LoRA experts' gates: the taste
                   tokens stay at their zero start (conditioner frozen) and the LoRA leaves the
                   cross-attention keys and values, which read the text and taste tokens, the
                   same for every initial noise. Every update is then a function of the noisy
                   image, so a taste cannot be served by adding one colour to every image.
  good enough      no reward above the head's q-quantile over the toy world's 1,200 images
                   (gradient zero there): an image that already pleases its taste stops moving.
  distinct         minus beta * sum over other tastes j of relu(r_j - r_k + margin): an image
                   made for taste k is charged where another taste's head rates it (nearly) as
                   high as k's own (the heads share the raters' rating scale).
  look code        each taste's LoRA expert split into 4 sub-experts, one picked per image by a
                   look code, a fixed function of its initial noise (argmax of 4 random
                   projections), plus lambda times the cross-entropy with which a reader (a
                   linear classifier per taste on CLIP features, trained alongside) tells the
                   code from the image: a mutual-information term that asks for 4 looks per
                   taste and leaves it to the policy where to put them, at best along what the
                   reward ignores.

Writes benchmarks/results/looks_probes_toy-base{S}.json per base seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from draft_options_toy import cross_taste_gold, demo_stages, held_out_images, toy_train_config

from plural_diffusion import conditioning
from plural_diffusion.ddpo import Trainer
from plural_diffusion.evaluate import vendi_score
from plural_diffusion.experts import routing_temperature

RESULTS = Path(__file__).resolve().parent / "results"
NO_CROSS_KV = (
    "lora.target_modules=[attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0,attn2.to_q,"
    "attn2.to_out.0]"
)


def freeze_taste_tokens(trainer: Trainer) -> None:
    """The taste tokens stay at their zero start: AdamW skips parameters without gradients."""
    for p in trainer.conditioner.parameters():
        p.requires_grad_(False)


def cap_rewards(trainer: Trainer, world_images: torch.Tensor, q: float) -> list[float]:
    """Each taste's reward no higher than its head's q-quantile over `world_images`."""
    n = len(world_images)
    with torch.no_grad():
        caps = torch.stack(
            [
                torch.quantile(
                    trainer._reward(world_images, trainer.tastes[k].expand(n, -1), None), q
                )
                for k in range(len(trainer.taste_names))
            ]
        )
    reward = trainer._reward

    def capped(images, z, taste, features=None):
        r = reward(images, z, taste, features)
        return torch.minimum(r, caps.to(r)[taste.to(r.device) % len(caps)])

    trainer._reward = capped
    return [round(c, 2) for c in caps.tolist()]


def charge_other_tastes(trainer: Trainer, beta: float, margin: float) -> None:
    """An image's reward for its taste k minus beta * sum_j relu(r_j - r_k + margin)."""
    rewards = trainer.rewards

    def distinct(images, z, taste, features=None):
        with torch.autocast(trainer.device.type, enabled=False):
            if features is None:
                features = rewards.features(images.float())
            scores = rewards.cluster_scores(features)  # [B, K]
        k = (taste % scores.shape[1]).to(scores.device)
        own = scores.gather(1, k[:, None])
        others = (scores - own + margin).clamp(min=0)
        others = others.masked_fill(torch.nn.functional.one_hot(k, scores.shape[1]).bool(), 0)
        return own[:, 0] - beta * others.sum(dim=1)

    trainer._reward = distinct


@contextlib.contextmanager
def look_codes(n_codes: int):
    """Trainers built inside have `n_codes` LoRA sub-experts per taste expert, one picked per
    image by its look code (`state["code"]`, set from each batch's initial noise)."""
    Conditioner = conditioning.TasteConditioner
    n_experts, set_experts = Trainer._n_experts, Conditioner.set_experts
    gates, draw_batch = Conditioner.gates, Trainer.draw_batch
    state = {}

    def sub_gates(self, z, batch):
        g = gates(self, z, batch)  # [B, E * n_codes + 1]: each expert's share split n_codes ways
        code = state["code"].repeat(batch // len(state["code"]))  # both halves of guidance
        pick = F.one_hot(code, n_codes).float().repeat(1, (g.shape[1] - 1) // n_codes)
        return torch.cat([g[:, :-1] * n_codes * pick.to(g), g[:, -1:]], dim=1)

    def coded_batch(self, batch):
        out = draw_batch(self, batch)
        if "projection" not in state:
            dim = out[3][0].numel()
            g = torch.Generator().manual_seed(5)
            state["projection"] = torch.randn(dim, n_codes, generator=g)
        state["code"] = (out[3].flatten(1).cpu().float() @ state["projection"]).argmax(dim=1)
        return out

    def duplicated_centroids(self, centroids):
        self.expert_centroids.copy_(centroids.repeat_interleave(n_codes, dim=0))
        self.expert_temperature.copy_(routing_temperature(centroids))

    Trainer._n_experts = lambda self: n_experts(self) * n_codes
    Trainer.draw_batch = coded_batch
    Conditioner.set_experts, Conditioner.gates = duplicated_centroids, sub_gates
    try:
        yield state
    finally:
        Trainer._n_experts, Trainer.draw_batch = n_experts, draw_batch
        Conditioner.set_experts, Conditioner.gates = set_experts, gates


def reward_readable_codes(trainer: Trainer, state: dict, n_codes: int, lam: float) -> None:
    """Reward minus lam * the cross-entropy of a per-taste linear reader of the look code."""
    rewards, n_tastes = trainer.rewards, len(trainer.taste_names)
    dim = rewards.encoder.dim
    weight = torch.zeros(n_tastes, dim, n_codes, requires_grad=True)
    bias = torch.zeros(n_tastes, n_codes, requires_grad=True)
    reader = torch.optim.Adam([weight, bias], lr=0.01)
    reward = trainer._reward

    def coded(images, z, taste, features=None):
        r = reward(images, z, taste, features)
        t, code = (taste % n_tastes).cpu(), state["code"]
        if features is None:
            features = rewards.features(images.float())
        features = features.cpu()
        for _ in range(5):  # the reader keeps up with the policy
            reader.zero_grad()
            logits = torch.einsum("bd,bdk->bk", features.detach(), weight[t]) + bias[t]
            F.cross_entropy(logits, code).backward()
            reader.step()
        logits = torch.einsum("bd,bdk->bk", features, weight[t].detach()) + bias[t].detach()
        return r - lam * F.cross_entropy(logits, code, reduction="none").to(r)

    trainer._reward = coded


LEVERS = {
    # name: (train overrides, what to do to the trainer before it trains)
    "defaults": ([], None),
    "taste tokens frozen": ([], freeze_taste_tokens),
    "no LoRA on cross-attention k/v": ([NO_CROSS_KV], None),
    "constant paths (both)": ([NO_CROSS_KV], freeze_taste_tokens),
    "good enough, q=0.9": ([], ("cap", 0.9)),
    "good enough, q=0.97": ([], ("cap", 0.97)),
    "distinct, beta=1": ([], ("distinct", 1.0)),
    "distinct, beta=3": ([], ("distinct", 3.0)),
    "look code, lambda=3": ([], ("code", 3.0)),
    "look code, lambda=20": ([], ("code", 20.0)),
}
N_CODES = 4


def one_base(seed: int, levers: list[str]) -> dict:
    assets, run, world, names, gold = demo_stages(seed)
    out = {}
    for name in levers:
        overrides, change = LEVERS[name]
        out_dir = f"runs/bench/looks_probes/{seed}/{name.replace(' ', '_')}"
        tcfg = toy_train_config(assets, run, out_dir, *overrides)
        coded = change and not callable(change) and change[0] == "code"
        with look_codes(N_CODES) if coded else contextlib.nullcontext() as state:
            row = train_and_score(tcfg, gold, names, world, change, state, out)
        out[name] = row
        print(f"base {seed}, {name}: {json.dumps(row)}", flush=True)
    return {"clusters": names, "levers": out}


def train_and_score(tcfg, gold, names, world, change, state, out: dict) -> dict:
    """Train one policy with `change` made to its trainer; held-out gold, Vendi, cross-taste."""
    trainer = Trainer(tcfg, gold_fn=gold)
    row = {}
    if callable(change):
        change(trainer)
    elif change and change[0] == "cap":
        row["caps"] = cap_rewards(trainer, world.images.images.float(), change[1])
    elif change and change[0] == "distinct":
        charge_other_tastes(trainer, change[1], margin=0.5)
    elif change:
        reward_readable_codes(trainer, state, N_CODES, change[1])
    if not out:
        _, images = held_out_images(trainer, base=True)
        out["base model"] = {
            "gold": [round(x, 3) for x in gold(images).mean(0).tolist()],
            "vendi": round(vendi_score(trainer.rewards.features(images)), 2),
        }
    history = trainer.fit(progress=False)
    taste, images = held_out_images(trainer)
    scores, features = gold(images), trainer.rewards.features(images)
    ks = range(len(names))
    cross = cross_taste_gold(scores, taste)
    row.update(
        {
            "seconds": round(sum(e["seconds"] for e in history)),
            "gold": [cross[k][k] for k in ks],
            "vendi": [round(vendi_score(features[taste == k]), 2) for k in ks],
            "cross_taste_gold": cross,
        }
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-seeds", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    for seed in args.base_seeds:
        result = one_base(seed, args.levers)
        command = f"python benchmarks/looks_probes_toy.py --base-seeds {seed}"
        path = RESULTS / f"looks_probes_toy-base{seed}.json"
        path.write_text(json.dumps({"command": command, **result}, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
