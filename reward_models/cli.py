"""`reward-models` command line: inspect ratings, extract features, train heads, evaluate them,
hold a social vote."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reward_models.config import load_config, to_dict
from reward_models.errors import UserError, run_cli, run_parser


def cmd_inspect(args) -> int:
    import warnings

    from reward_models.data import detect_format, load_ratings
    from reward_models.data.summary import format_summary, summarize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary lists the skipped rows itself
        data = load_ratings(args.path, args.format, args.image_root, on_error="skip")
    layout = detect_format(args.path)[0] if args.format == "auto" else args.format
    print(format_summary(args.path, layout, summarize(data)))
    return 0


def cmd_features(args) -> int:
    from reward_models.features import extract_features

    files, feats, cache = extract_features(
        args.images, args.model, args.pretrained, args.cache_dir, batch_size=args.batch_size
    )
    print(
        f"{len(files)} images -> features of dimension {feats.shape[1]}; "
        f"encoded {cache.num_encoded} new, cache at {cache.dir}"
    )
    return 0


def cmd_train(args) -> int:
    from reward_models.workflow import RewardTrainConfig, train

    cfg = load_config(RewardTrainConfig, args.config, args.overrides)
    out = train(cfg)
    print(f"trained mean head, rater head and taste clusters in {out}")
    return 0


def cmd_eval(args) -> int:
    from reward_models.io import write_json
    from reward_models.workflow import evaluate

    metrics = evaluate(args.run)
    out = args.out or Path(args.run) / "metrics.json"
    write_json(out, metrics)
    print(format_metrics(metrics))
    print(f"wrote {out}")
    return 0


def cmd_social(args) -> int:
    import dataclasses

    from reward_models.features import extract_features
    from reward_models.social_choice.electorate import ElectorateConfig
    from reward_models.social_choice.social_head import fit_social_head
    from reward_models.social_choice.vote import check_rule, save_social_vote, social_vote
    from reward_models.workflow import load_run

    check_rule(args.rule)  # before any model is loaded
    if not args.candidates.is_dir():
        raise UserError(f"{args.candidates}: no such directory of candidate images")
    run = load_run(args.heads)
    clip = run.cfg.clip
    cache_dir = clip.cache_dir or args.heads.parent / "features"
    files, features, _ = extract_features(
        [args.candidates], clip.model, clip.pretrained, cache_dir, clip.batch_size, clip.device
    )
    names = [f.relative_to(args.candidates).as_posix() for f in files]
    cfg = ElectorateConfig(n_voters=args.voters, seed=args.seed, weighting=args.weighting)
    vote = social_vote(run.rater, run.rater.rater_tastes(), features, names, args.rule, cfg)
    head = fit_social_head(
        features,
        vote.ranking,
        run.cfg.mean_head,  # shaped like the run's own mean head
        dataclasses.replace(run.cfg.train, seed=args.seed, progress=False),
    )
    out = args.out or args.heads / "social" / args.rule
    save_social_vote(vote, head, out, {"rater_run": str(args.heads), "clip_model": clip.model})
    print(format_social(vote.record()))
    print(f"wrote {out / 'ranking.json'} and the social head {out / 'head'}")
    return 0


def format_social(record: dict, limit: int = 20) -> str:
    """The social order as a table: place, score, candidate (the first `limit` places)."""
    lines = [
        f"{record['rule']} over {record['n_voters']} simulated voters "
        f"({record['components']} taste components by BIC), {len(record['order'])} candidates",
        f"{'place':>5}  {'score':>10}  candidate",
    ]
    for row in record["order"][:limit]:
        lines.append(f"{row['place']:>5}  {row['score']:>10.4g}  {row['candidate']}")
    if len(record["order"]) > limit:
        lines.append(f"  ... {len(record['order']) - limit} more in ranking.json")
    lines.append(f"Condorcet winner: {record['condorcet_winner'] or 'none'}")
    return "\n".join(lines)


def format_metrics(metrics: dict) -> str:
    """A table per grouping: pairwise accuracy per group, mean head next to rater head."""
    lines = []
    heads = metrics["heads"]
    for grouping in heads["mean"]:
        groups = list(heads["mean"][grouping]["per_group"])
        lines.append(f"held-out pairwise accuracy by {grouping.replace('_', ' ')}")
        lines.append(f"{'head':<8}" + "".join(f"{g:>12}" for g in groups) + f"{'worst':>10}")
        for head, m in heads.items():
            per = m[grouping]["per_group"]
            row = "".join(f"{per[g]['pairwise_accuracy']:>12.3f}" for g in groups)
            lines.append(
                f"{head:<8}" + row + f"{m[grouping]['worst_group']['pairwise_accuracy']:>10.3f}"
            )
    if "cluster_ari_vs_known_groups" in metrics:
        lines.append(
            f"discovered clusters vs known groups: ARI {metrics['cluster_ari_vs_known_groups']:.3f}"
        )
    return "\n".join(lines)


def cmd_show_config(args) -> int:
    import yaml

    from reward_models.workflow import RewardTrainConfig

    cfg = load_config(RewardTrainConfig, args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reward-models", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    ins = sub.add_parser(
        "inspect", help="load ratings and summarise what was read: raters, images, pairs, skips"
    )
    ins.add_argument("path", type=Path, help="a ratings file or dataset folder")
    ins.add_argument(
        "--format", default="auto", help="auto (by file name), scores, pairs, para, flickr_aes, ..."
    )
    ins.add_argument(
        "--image-root", type=Path, default=None, help="folder the image paths are relative to"
    )
    ins.set_defaults(func=cmd_inspect)

    feat = sub.add_parser("features", help="extract (and cache) CLIP features of images")
    feat.add_argument("images", nargs="+", type=Path, help="image files or folders")
    feat.add_argument("--model", required=True, help="open_clip name, local-dir:PATH or hf-hub:ID")
    feat.add_argument("--pretrained", default=None, help="tag or checkpoint for a named model")
    feat.add_argument("--cache-dir", type=Path, required=True)
    feat.add_argument("--batch-size", type=int, default=128)
    feat.set_defaults(func=cmd_features)

    for name, func, text in (
        ("train", cmd_train, "train the mean head, the rater head and taste clusters"),
        ("config", cmd_show_config, "print the resolved training config"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", type=Path, default=None, help="YAML config")
        p.add_argument("overrides", nargs="*", metavar="key=value")
        p.set_defaults(func=func)

    ev = sub.add_parser("eval", help="held-out metrics of a trained run, written as JSON")
    ev.add_argument("--run", type=Path, required=True, help="directory written by `train`")
    ev.add_argument(
        "--out", type=Path, default=None, help="metrics file (default RUN/metrics.json)"
    )
    ev.set_defaults(func=cmd_eval)

    so = sub.add_parser(
        "social", help="rank candidate images by a vote of simulated raters; train a social head"
    )
    so.add_argument("--heads", type=Path, required=True, help="run directory written by `train`")
    so.add_argument("--rule", default="borda", help="aggregation rule (borda, copeland, ...)")
    so.add_argument("--candidates", type=Path, required=True, help="folder of candidate images")
    so.add_argument(
        "--out", type=Path, default=None, help="output folder (default HEADS/social/RULE)"
    )
    so.add_argument("--voters", type=int, default=1000, help="simulated voters")
    so.add_argument("--seed", type=int, default=0)
    so.add_argument(
        "--weighting",
        choices=["population", "equal_groups"],
        default="population",
        help="count taste groups by their share of raters, or each group equally",
    )
    so.set_defaults(func=cmd_social)
    return parser


def main(argv=None) -> None:
    sys.exit(run_cli(lambda a: run_parser(build_parser(), a), argv))


if __name__ == "__main__":
    main()
