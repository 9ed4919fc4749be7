"""What every benchmark child runs: `python -m benchmarks.harness child SPEC_JSON | baseline CLS | build CLS PATH CONFIG`.

child: one contender through its case's phases (`benchmarks.harness.child`), the result written to
the spec's `out` after each; baseline: the imports of every contender and nothing built (the
allowance of capped runs); build: a random-weight transformers model saved at PATH.
"""

import time

STARTED = time.monotonic()  # a child's deadline counts from here, its imports included

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "child":
        from benchmarks.harness.child import run

        return run(json.loads(argv[1]), STARTED)
    if len(argv) == 2 and argv[0] == "baseline":
        from benchmarks.harness.child import baseline

        baseline(argv[1])
        return 0
    if len(argv) == 4 and argv[0] == "build":
        from benchmarks.harness.models import build

        build(argv[1], Path(argv[2]), json.loads(argv[3]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
