#!/usr/bin/env python3
"""Write docs/configuration.md from the Settings dataclass (`--check`: exit 1 if the page is out of date)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpuwatch.config_docs import config_reference

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare; do not write")
    args = parser.parse_args()
    text = config_reference()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python scripts/gen-config-docs.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
