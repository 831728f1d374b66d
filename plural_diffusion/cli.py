"""`plural-diffusion` command line: the demo, toy world preparation, training, generation per
taste and evaluation against the mean baseline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plural_diffusion.configs import CONFIGS, config_path
from reward_models.config import load_config, to_dict
from reward_models.errors import UserError, run_cli, run_parser


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    shipped = f"; default: {default}" if default else ""
    p.add_argument(
        "--config",
        type=config_path,
        default=None,
        help=f"YAML config: a file, or the name of a shipped one (toy.yaml, sd15.yaml{shipped})",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _default_config(name: str) -> Path | None:
    path = CONFIGS / name
    return path if path.is_file() else None


def cmd_toy_prepare(args) -> int:
    from plural_diffusion.toyworld.prepare import ToyPrepareConfig, prepare_toy

    cfg = load_config(
        ToyPrepareConfig, args.config or _default_config("toy-prepare.yaml"), args.overrides
    )
    assets = prepare_toy(cfg, root=args.cache_dir, rebuild=args.rebuild)
    print(f"toy world : {assets.world}")
    print(f"tiny CLIP : {assets.clip}")
    print(f"tiny base : {assets.base}")
    print("seconds   : " + ", ".join(f"{k} {v:.1f}" for k, v in assets.seconds.items()))
    return 0


def cmd_toy_world(args) -> int:
    from plural_diffusion.toyworld.ratings import ToyWorldConfig, write_world

    cfg = load_config(ToyWorldConfig, args.config, args.overrides)
    world = write_world(cfg, args.out)
    print(f"wrote {len(world.images)} images rated by {len(world.raters)} raters to {args.out}")
    return 0


def _quiet_model_loading() -> None:
    """diffusers and transformers draw a progress bar per model they load; ours say more."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def cmd_demo(args) -> int:
    from plural_diffusion.demo import DemoConfig, run_demo

    _quiet_model_loading()
    name = "demo-fast.yaml" if args.fast else "demo.yaml"
    cfg = load_config(DemoConfig, args.config or _default_config(name), args.overrides)
    run_demo(cfg, out_dir=args.out, cache_dir=args.cache_dir)
    return 0


def cmd_train(args) -> int:
    from plural_diffusion.ddpo import SELECTED_DIR, final_checkpoint, train
    from plural_diffusion.policy import CheckpointInfo
    from plural_diffusion.train_config import TrainConfig

    cfg = load_config(TrainConfig, args.config or _default_config("toy.yaml"), args.overrides)
    out = train(cfg, resume=args.resume)
    print(f"trained {cfg.objective} policy ({cfg.method}); checkpoints in {out / 'checkpoints'}")
    policy = final_checkpoint(out / "checkpoints")
    if policy is not None and policy.name == SELECTED_DIR:
        picked = CheckpointInfo.read(policy).experts_from
        experts = ", ".join(f"{name} {ckpt}" for name, ckpt in picked.items())
        print(f"each taste's expert from: {experts}; the policy: {policy}")
    return 0


def _sampling_overrides(args):
    """The sampler values given on the command line; the others stay as the policy was trained."""
    from plural_diffusion.policy import SamplingOverrides

    return SamplingOverrides(
        steps=args.steps,
        guidance_scale=args.guidance,
        eta=args.eta,
        negative_prompt=args.negative_prompt,
    ).check()


def cmd_generate(args) -> int:
    import torch

    from plural_diffusion.generate import parse_seeds, run_generate

    torch.set_num_threads(args.threads)
    _quiet_model_loading()
    manifest = run_generate(
        base=args.base,
        checkpoint=args.checkpoint,
        rewards_dir=args.rewards,
        taste_specs=args.taste,
        ratings=args.ratings,
        interpolate_pair=args.interpolate,
        interpolate_steps=args.interpolate_steps,
        prompts=args.prompt,
        seeds=parse_seeds(args.seeds, args.seed_list),
        overrides=_sampling_overrides(args),
        out_dir=args.out,
        batch_size=args.batch_size,
        device=args.device,
        dtype=_model_dtype(args),
        lottery=args.lottery,
        compile_unet=args.compile,
    )
    n = sum(len(p["images"]) for p in manifest["prompts"])
    tastes = ", ".join(t["label"] for t in manifest["tastes"])
    print(f"wrote {n} images ({tastes}) and {len(manifest['prompts'])} grid(s) to {args.out}")
    for p in manifest["prompts"]:
        print(f"  grid: {args.out / p['grid']}")
    return 0


def cmd_serve(args) -> int:
    import torch

    from plural_diffusion.web import Server

    torch.set_num_threads(args.threads)
    if args.collect is not None:
        from plural_diffusion.collect import CollectConfig, Collector, create_app

        if args.checkpoint is not None:
            raise UserError("serve takes --checkpoint or --collect, not both")
        if args.out is None:
            raise UserError("--collect needs --out RATINGS_DIR: where scores.csv and pairs.csv go")
        collector = Collector(
            CollectConfig(
                images=str(args.collect),
                out=str(args.out),
                raters=args.rater,
                scores_per_rater=args.scores_per_rater,
                pairs_per_rater=args.pairs_per_rater,
            )
        )
        server = Server(create_app(collector), args.host, args.port)
        print(
            f"collecting ratings into {collector.out} (scores.csv, pairs.csv); each rater's link:"
        )
        for rater, link in collector.links(server.url).items():
            print(f"  {rater}: {link}")
    else:
        from plural_diffusion.serve import ServeConfig, build

        if args.checkpoint is None:
            raise UserError("serve needs --checkpoint CK (rate and receive) or --collect IMAGE_DIR")
        _quiet_model_loading()
        cfg = ServeConfig(
            checkpoint=str(args.checkpoint),
            out=str(args.out or Path("outputs/serve")),
            rewards=args.rewards,
            images=args.images,
            base=args.base,
            prompts=args.prompt,
            seeds=args.seeds,
            per_round=args.per_round,
            device=args.device,
            dtype=_model_dtype(args),
        )
        app, session = build(cfg)
        server = Server(app, args.host, args.port)
        print(f"ratings are saved to {session.ratings_file} (the file generate --ratings reads)")
        print(f"open {server.url}")
    try:
        server.server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    return 0


def _named_values(
    items: list[str],
    flag: str,
    form: str = "NAME=DIR",
    example: str = "matched=runs/matched/checkpoints/epoch-0012",
) -> dict[str, str]:
    """['mean=VALUE', ...] -> {'mean': VALUE}, with one-line errors for bad or repeated names."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name or not value:
            raise UserError(f"{flag} {item!r}: expected {form}, e.g. {flag} {example}")
        if name in out or name == "base":
            why = "is always evaluated" if name == "base" else "is given twice"
            raise UserError(f"{flag} {item!r}: the name {name!r} {why}; choose another name")
        out[name] = value
    return out


def _named_dirs(items: list[str], flag: str) -> dict[str, Path]:
    return {name: Path(value) for name, value in _named_values(items, flag).items()}


def cmd_evaluate(args) -> int:
    import torch

    from plural_diffusion.evaluate import EvalConfig, evaluate_policies, toy_gold
    from plural_diffusion.generate import parse_seeds
    from plural_diffusion.lottery import fit_lottery
    from plural_diffusion.policy import CheckpointInfo, policy_dir
    from plural_diffusion.report import summary_table, write_report
    from plural_diffusion.rewards import TasteRewards
    from reward_models.io import write_json

    torch.set_num_threads(args.threads)
    _quiet_model_loading()
    policies = {n: policy_dir(p) for n, p in _named_dirs(args.policy, "--policy").items()}
    curves = _named_dirs(args.checkpoints, "--checkpoints")
    trained = next((CheckpointInfo.read(p).config for p in policies.values()), {})
    base = args.base or trained.get("base")
    rewards_dir = args.rewards or trained.get("rewards")
    if not base:
        raise UserError("no base model: pass --base DIR_OR_HUB_ID")
    if not rewards_dir:
        raise UserError("no reward run: pass --rewards RUN_DIR (from `reward-models train`)")
    rewards = TasteRewards(str(rewards_dir), device=args.device)
    world = args.toy_world
    if world is None and (Path(rewards.run.cfg.data.path) / "world.json").is_file():
        world = Path(rewards.run.cfg.data.path)  # the reward heads were trained on a toy world
    gold_fn = None if world is None else toy_gold(world, rewards.cluster_names)
    seeds = parse_seeds(args.seeds, args.seed_list)
    cfg = EvalConfig(
        prompts=args.prompt or trained.get("prompts", [])[:2] or EvalConfig().prompts,
        seed_list=seeds,
        images_per_prompt=len(seeds),
        sampling=_sampling_overrides(args),
        batch_size=args.batch_size,
        curve_images_per_prompt=args.curve_seeds,
        dtype=_model_dtype(args),
        compile_unet=args.compile,
    )
    baseline = args.baseline or ("mean" if "mean" in policies else "base")
    lotteries = {}
    for name, source in _named_values(
        args.lottery, "--lottery", "NAME=POLICY", "maxmin=matched"
    ).items():
        if name in policies:  # _named_values has refused "base"
            raise UserError(f"--lottery {name}={source}: {name!r} is already a policy's name")
        if source not in policies:
            raise UserError(
                f"--lottery {name}={source}: {source!r} is not a --policy of this evaluation"
            )
        start = max(seeds) + 100_000  # calibration seeds the evaluation does not use
        fitted = fit_lottery(
            base,
            policies[source],
            rewards,
            cfg.prompts,
            [start + i for i in range(args.lottery_seeds)],
            cfg.sampling,
            cfg.batch_size,
            device=args.device,
        )
        write_json(args.out / f"lottery-{name}.json", fitted)
        lotteries[name] = (source, torch.tensor(fitted["shares"]))
        shares = ", ".join(f"{n} {x:.2f}" for n, x in zip(fitted["clusters"], fitted["shares"]))
        print(f"{name}: the egalitarian lottery over {source}'s clusters ({shares})")
    print(
        f"evaluating {', '.join(['base', *policies])} on {len(cfg.prompts)} prompt(s) x "
        f"{len(seeds)} seed(s); gold utilities: {world or 'none (not a toy world)'}"
    )
    metrics, images = evaluate_policies(
        base,
        policies,
        rewards,
        cfg,
        gold_fn,
        baseline,
        curves,
        device=args.device,
        lotteries=lotteries,
    )
    write_json(args.out / "metrics.json", metrics)
    report = write_report(args.out / "report.html", metrics, images)
    print()
    print(summary_table(metrics))
    print(f"\nwrote {args.out / 'metrics.json'}")
    print(f"report: {report.resolve()}")
    return 0


def cmd_export(args) -> int:
    from plural_diffusion.export import EXPORT_JSON, export_diffusers

    _quiet_model_loading()
    out = export_diffusers(
        args.checkpoint, args.out, args.taste, args.rewards, args.base, device=args.device
    )
    print(f"wrote a diffusers StableDiffusionPipeline to {out} (load it with from_pretrained)")
    print(f"trained sampler (steps, guidance, eta, negative prompt): {out / EXPORT_JSON}")
    return 0


def cmd_show_config(args) -> int:
    import yaml

    from plural_diffusion.demo import DemoConfig
    from plural_diffusion.toyworld.prepare import ToyPrepareConfig
    from plural_diffusion.train_config import TrainConfig

    kinds = {"toy-prepare": ToyPrepareConfig, "demo": DemoConfig, "train": TrainConfig}
    cfg = load_config(kinds[args.kind], args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--dtype, read back (and checked against --device) by `_model_dtype`."""
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="the UNet's, VAE's and text encoder's dtype (bf16 or fp16 on a GPU: half the "
        "memory and faster; the LoRA and the taste module stay float32)",
    )


def _model_dtype(args) -> str:
    if args.dtype == "fp16" and not str(args.device).startswith("cuda"):
        raise UserError(
            f"--dtype fp16 runs on a CUDA GPU (--device {args.device}); use --dtype bf16 or fp32"
        )
    return args.dtype


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    """Options `generate` and `evaluate` share: models, prompts, seeds, sampling."""
    p.add_argument(
        "--base",
        default=None,
        help="base model: diffusers SD dir or hub id "
        "(default: the one the checkpoint was trained on)",
    )
    p.add_argument(
        "--rewards",
        type=Path,
        default=None,
        help="reward run of the taste vectors (default: the one the checkpoint was trained with)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="prompt (repeatable; default: the first two the checkpoint was trained on)",
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds", type=int, default=None, metavar="N", help="seeds 0..N-1 (default 4)"
    )
    seeds.add_argument("--seed-list", default=None, metavar="S1,S2,...", help="explicit seeds")
    trained = "default: as the policy was trained"
    p.add_argument("--steps", type=int, default=None, help=f"DDIM denoising steps ({trained})")
    p.add_argument(
        "--guidance", type=float, default=None, help=f"classifier-free guidance scale ({trained})"
    )
    p.add_argument("--eta", type=float, default=None, help=f"DDIM noise in [0, 1] ({trained})")
    p.add_argument(
        "--negative-prompt", default=None, metavar="TEXT", help=f"negative prompt ({trained})"
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per sampling call")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    _add_dtype_arg(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet: on a GPU ~1.6x the images/s after a minute of compiling",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: the tiny toy models run fastest on one)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plural-diffusion", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the end-to-end job on the built-in toy world")
    demo.add_argument("--fast", action="store_true", help="smoke-sized run of every stage")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory")
    demo.add_argument("--cache-dir", type=Path, default=None, help="stage cache directory")
    _add_config_args(demo, "demo.yaml, or demo-fast.yaml with --fast")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="RL fine-tune a taste-conditioned LoRA policy")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    _add_config_args(train, "toy.yaml")
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="images per taste from a base model and a trained policy")
    _add_policy_args(gen)
    gen.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="trained policy (RUN/checkpoints/epoch-NNNN, RUN/checkpoints/selected, or its policy/); default: the base model",
    )
    gen.add_argument(
        "--taste",
        action="append",
        default=[],
        metavar="SPEC",
        help="cluster:NAME_OR_INDEX, rater:ID, ratings:FILE, nearest:FILE or mean (repeatable; "
        "default: every cluster, or mean for a taste-blind policy)",
    )
    gen.add_argument(
        "--ratings",
        action="append",
        default=[],
        metavar="FILE",
        help="a new user's ratings (table with image and score columns): their taste "
        "is fitted without retraining (repeatable)",
    )
    gen.add_argument(
        "--interpolate",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="also generate tastes on the line from taste A to taste B",
    )
    gen.add_argument(
        "--interpolate-steps",
        type=int,
        default=5,
        metavar="N",
        help="tastes on the interpolation line, ends included (default 5)",
    )
    gen.add_argument(
        "--lottery",
        type=Path,
        default=None,
        metavar="FILE",
        help="the egalitarian lottery (lottery.json from the demo or evaluate --lottery): each "
        "image made for a cluster drawn with its shares; the policy turns taste-blind",
    )
    gen.add_argument("--out", type=Path, default=Path("outputs/generate"), help="output directory")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser(
        "evaluate", help="measure policies per taste cluster against the mean baseline"
    )
    _add_policy_args(ev)
    ev.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a trained policy checkpoint (repeatable); the base model is always included",
    )
    ev.add_argument(
        "--checkpoints",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a training run's checkpoints/ folder (epoch-NNNN), for the over-optimisation curve",
    )
    ev.add_argument(
        "--toy-world",
        type=Path,
        default=None,
        help="toy world folder, for gold utilities (default: the reward run's data, if a toy world)",
    )
    ev.add_argument(
        "--baseline",
        default=None,
        help="policy to compare with (default: mean if given, else base)",
    )
    ev.add_argument(
        "--curve-seeds",
        type=int,
        default=4,
        metavar="N",
        help="seeds per prompt and taste at each checkpoint of a curve (default 4)",
    )
    ev.add_argument(
        "--lottery",
        action="append",
        default=[],
        metavar="NAME=POLICY",
        help="a taste-blind policy made of a taste-matched --policy: each image that policy's "
        "image for a cluster drawn with egalitarian shares (repeatable; e.g. maxmin=matched)",
    )
    ev.add_argument(
        "--lottery-seeds",
        type=int,
        default=16,
        metavar="N",
        help="seeds per prompt and cluster the lottery's shares are fitted on (default 16), "
        "after the evaluation's own",
    )
    ev.add_argument("--out", type=Path, default=Path("outputs/evaluate"), help="output directory")
    ev.set_defaults(func=cmd_evaluate)

    serve = sub.add_parser(
        "serve",
        help="a local page: rate a few images and get images for your taste, or collect ratings",
    )
    serve.add_argument("--checkpoint", type=Path, default=None, help="a taste-conditioned policy")
    serve.add_argument("--rewards", default=None, help="its reward run (default: the trained one)")
    serve.add_argument("--base", default=None, help="base model (default: the trained one)")
    serve.add_argument(
        "--images", default=None, help="images to rate (default: the reward run's training images)"
    )
    serve.add_argument(
        "--prompt", action="append", default=[], help="prompt to generate for (repeatable)"
    )
    serve.add_argument("--seeds", type=int, default=4, help="images per prompt (default 4)")
    serve.add_argument("--per-round", type=int, default=4, help="images asked per round")
    serve.add_argument(
        "--collect", type=Path, default=None, metavar="IMAGE_DIR", help="collect ratings instead"
    )
    serve.add_argument(
        "--rater", action="append", default=[], help="with --collect: a rater's name (repeatable)"
    )
    serve.add_argument("--scores-per-rater", type=int, default=20)
    serve.add_argument("--pairs-per-rater", type=int, default=20)
    serve.add_argument(
        "--out", type=Path, default=None, help="ratings folder (default outputs/serve)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    serve.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    _add_dtype_arg(serve)
    serve.add_argument("--threads", type=int, default=1, help="torch threads")
    serve.set_defaults(func=cmd_serve)

    export = sub.add_parser(
        "export",
        help="a policy for one taste as a plain diffusers pipeline folder (where that is exact)",
    )
    export.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="trained policy (RUN/checkpoints/epoch-NNNN or RUN/checkpoints/selected)",
    )
    export.add_argument(
        "--taste",
        default="mean",
        metavar="SPEC",
        help="the taste to bake in: cluster:NAME_OR_INDEX, rater:ID, ratings:FILE, nearest:FILE or mean "
        "(default mean)",
    )
    export.add_argument(
        "--rewards",
        type=Path,
        default=None,
        help="reward run of the tastes (default: the one the checkpoint was trained with)",
    )
    export.add_argument("--base", default=None, help="base model (default: the trained one)")
    export.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    export.add_argument("out", type=Path, help="output folder")
    export.set_defaults(func=cmd_export)

    toy = sub.add_parser("toy", help="the built-in toy taste world").add_subparsers(
        dest="toy_command", required=True
    )
    prep = toy.add_parser("prepare", help="build and cache the toy world and its tiny models")
    prep.add_argument("--cache-dir", type=Path, default=None, help="stage cache directory")
    prep.add_argument("--rebuild", action="store_true", help="ignore cached stages")
    _add_config_args(prep, "toy-prepare.yaml")
    prep.set_defaults(func=cmd_toy_prepare)

    world = toy.add_parser("world", help="write a rated toy world (images + tables) to a folder")
    world.add_argument("--out", type=Path, required=True)
    _add_config_args(world, None)
    world.set_defaults(func=cmd_toy_world)

    show = sub.add_parser("config", help="print a config with defaults and overrides applied")
    show.add_argument("kind", choices=["toy-prepare", "demo", "train"])
    _add_config_args(show, None)
    show.set_defaults(func=cmd_show_config)
    return parser


def main(argv=None) -> None:
    sys.exit(run_cli(lambda a: run_parser(build_parser(), a), argv))


if __name__ == "__main__":
    main()
