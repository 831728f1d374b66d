"""`plural-diffusion` command line: toy world preparation and the end-to-end demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reward_models.config import load_config, to_dict
from reward_models.errors import run_cli, run_parser

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", type=Path, default=None, help=f"YAML config (default: {default})")
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


def cmd_demo(args) -> int:
    from plural_diffusion.demo import DemoConfig, run_demo

    name = "demo-fast.yaml" if args.fast else "demo.yaml"
    cfg = load_config(DemoConfig, args.config or _default_config(name), args.overrides)
    run_demo(cfg, out_dir=args.out, cache_dir=args.cache_dir)
    return 0


def cmd_train(args) -> int:
    from plural_diffusion.ddpo import train
    from plural_diffusion.train_config import TrainConfig

    cfg = load_config(TrainConfig, args.config or _default_config("toy.yaml"), args.overrides)
    out = train(cfg, resume=args.resume)
    print(f"trained {cfg.objective} policy ({cfg.method}); checkpoints in {out / 'checkpoints'}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plural-diffusion", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the end-to-end job on the built-in toy world")
    demo.add_argument("--fast", action="store_true", help="smoke-sized run (about a minute)")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory")
    demo.add_argument("--cache-dir", type=Path, default=None, help="stage cache directory")
    _add_config_args(demo, "configs/demo.yaml")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="RL fine-tune a taste-conditioned LoRA policy")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    _add_config_args(train, "configs/toy.yaml")
    train.set_defaults(func=cmd_train)

    toy = sub.add_parser("toy", help="the built-in toy taste world").add_subparsers(
        dest="toy_command", required=True
    )
    prep = toy.add_parser("prepare", help="build and cache the toy world and its tiny models")
    prep.add_argument("--cache-dir", type=Path, default=None, help="stage cache directory")
    prep.add_argument("--rebuild", action="store_true", help="ignore cached stages")
    _add_config_args(prep, "configs/toy-prepare.yaml")
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
