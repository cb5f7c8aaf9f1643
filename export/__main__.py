"""`python -m export` and the `blip2-export` console script: `python -m export.build` under other names."""
import sys

from export.startup import prepare


def main() -> int:
    prepare()
    from export.build import main as build

    return build()


if __name__ == "__main__":
    sys.exit(main())
