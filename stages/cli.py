"""What every stage does at its edge: exit codes and the one error line.

Exit codes, the same in every stage:

* 0 -- done, every output written.
* 1 -- the run failed for a reason outside its input, or part of it failed after the outputs
  were written: a download host or MLflow unreachable, an ablation variant that failed. A
  rerun may succeed; the line on stderr says what.
* 2 -- bad input or config: a params key, a file, a value. One line on stderr names it, with
  no traceback, and nothing was written (stages write whole or not at all, `pipeline.io`).

Anything else (a bug, an interrupted run) keeps Python's traceback and exit code.
"""

from __future__ import annotations

import sys

DONE = 0
FAILED = 1
BAD_INPUT = 2


def fail(stage: str, error: BaseException | str, code: int = BAD_INPUT) -> int:
    """Print ``stages.<stage>: error: <error>`` on stderr; return ``code`` for ``main()``."""
    print(f"stages.{stage}: error: {error}", file=sys.stderr)
    return code
