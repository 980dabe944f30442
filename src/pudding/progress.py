"""Progress bars for anything that takes more than a few seconds (shown on terminals, silent in logs)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from tqdm.auto import tqdm


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, unit: str = "tok") -> Iterator[Callable[[int], None]]:
    bar = tqdm(total=total, desc=description, unit=unit, unit_scale=True, leave=False, file=sys.stderr,
               disable=not sys.stderr.isatty(), dynamic_ncols=True)
    try:
        yield bar.update
    finally:
        bar.close()
