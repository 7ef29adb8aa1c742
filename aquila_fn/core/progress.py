"""Progress bars of the jobs: tqdm on stderr (results go to stdout, so the two never mix)."""

from __future__ import annotations

import sys
from typing import Iterable


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 enabled: bool = True):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)
