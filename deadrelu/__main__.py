"""`python -m deadrelu` and the `deadrelu` console script."""

from __future__ import annotations

import sys


def main() -> None:
    """The command line, with the import of its dependencies (torch: about 1.5 s) and the
    building of its commands inside the Ctrl-C handling too: interrupted there, it exits 130
    with one line, as it does once a command runs."""
    from deadrelu.errors import ExitCode

    try:
        from deadrelu.cli import main as run_cli

        run_cli()
    except KeyboardInterrupt:
        print("deadrelu: error: interrupted", file=sys.stderr)
        raise SystemExit(int(ExitCode.INTERRUPTED)) from None


if __name__ == "__main__":
    main()
