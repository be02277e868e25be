"""Commands outside pytest.

  python -m pytest_rlparity diff A B                       two golden sets or two JSON reports, per layer
  python -m pytest_rlparity wheelhouse {build,install} ...  offline installs for GPU runners
  python -m pytest_rlparity make-model DIR --shape llama-1b   a random-weight model of a real shape, no download
  python -m pytest_rlparity bench [PYTEST ARGS]             the suite's wall time, engine starts and time in checks
  python -m pytest_rlparity options                         every option, its ini key and default (the README's table)
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "diff":
        from .diff import main as diff

        return diff(argv[1:])
    if argv[0] == "wheelhouse":
        from .wheelhouse import main as wheelhouse

        return wheelhouse(argv[1:])
    if argv[0] == "make-model":
        from .shapes import main as make_model

        return make_model(argv[1:])
    if argv[0] == "bench":
        from .bench import main as bench

        return bench(argv[1:])
    if argv[0] == "options":
        from .config import options_table

        print(options_table())
        return 0
    print(f"unknown command {argv[0]!r}; try: python -m pytest_rlparity --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
