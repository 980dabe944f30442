"""`python -m pudding.harness ARGS`: lm-eval's command line (`lm_eval ARGS`) with the "pudding" model registered and,
unless --include_path is given, pudding's task configs included (they read the local task data, not the HF hub).

    python -m pudding.harness --model pudding --model_args bundle=DIR --tasks arc_easy,piqa
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        from lm_eval.__main__ import cli_evaluate

        from pudding.errors import PuddingError
        from pudding.harness import TASKS_DIR
    except ImportError as missing:
        print(f"error: the lm-evaluation-harness plugin needs lm_eval ({missing}): pip install 'pudding[eval]'", file=sys.stderr)
        raise SystemExit(2) from None
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    except PuddingError as problem:
        print("error: " + " ".join(str(problem).split()), file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
