"""The ``fused-losses`` console command: ``train`` and ``plan`` sub-commands."""
from __future__ import annotations

import sys

USAGE = "usage: fused-losses {train,plan} [options]   (fused-losses SUBCOMMAND --help)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .trainer.loop import main as train_main
        return train_main(rest)
    if command == "plan":
        from .planner import main as plan_main
        return plan_main(rest)
    print(f"fused-losses: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
