"""The one exception type for mistakes a user can make (bad tables, missing files, wrong sizes).

CLIs catch it and print its message as a single line with a non-zero exit; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what and how, in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def run_parser(parser, argv=None) -> int:
    """Parse `argv`, set up logging (-v: INFO) and run the chosen subcommand's `func(args)`."""
    import logging

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; a UserError becomes one line on stderr and exit status 2."""
    import sys

    try:
        return int(main(argv) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, rerun to resume", file=sys.stderr)
        return 130
