"""`python -m benchmarks.harness child SPEC_JSON | baseline CLS | build CLS PATH CONFIG_JSON`: what benchmark children run.

child: one contender through its case's phases (`benchmarks.harness.child`); baseline: every contender's imports,
nothing built (the allowance of capped runs); build: a random-weight transformers model saved at PATH.
"""

import time

STARTED = time.monotonic()  # a child's deadline counts from here, its imports included

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def main(argv: list[str]) -> int:
    from benchmarks.harness import child, models

    if len(argv) == 2 and argv[0] == "child":
        return child.run(json.loads(argv[1]), STARTED)
    if len(argv) == 2 and argv[0] == "baseline":
        return child.baseline(argv[1])
    if len(argv) == 4 and argv[0] == "build":
        return models.build(argv[1], Path(argv[2]), json.loads(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
