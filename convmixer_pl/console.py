"""What a person reads: `convmixer: ...` notes and the one-line errors and exit codes of every entry point.

Notes come from the job's first process only (Lightning's `rank_zero_only`). An entry point runs through
`run_entry_point`: a bad input (a `ValueError` the project raises, or Lightning's `MisconfigurationException`)
ends in one line `convmixer[ tool]: error: <message>` and exit code 2; `CONVMIXER_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only

T = TypeVar("T")


@rank_zero_only
def say(message: str) -> None:
    """One `convmixer: <message>` line on stderr, from the job's first process."""
    print(f"convmixer: {message}", file=sys.stderr, flush=True)


def debugging() -> bool:
    return bool(os.environ.get("CONVMIXER_DEBUG"))


def one_line(err: BaseException) -> str:
    """The message of the project's own error behind `err`, on one line.

    jsonargparse wraps errors raised while building the model or data module, and a DataLoader worker re-raises
    with the worker's traceback in the message; the user needs the original sentence.
    """
    chain: list[BaseException] = []
    while err is not None and len(chain) < 20:
        chain.append(err)
        err = err.__cause__ or err.__context__
    own = next((e for e in chain if type(e).__module__.startswith("convmixer_pl")), None)
    if own is None:
        own = chain[-1] if "\n" in str(chain[0]) and isinstance(chain[-1], ValueError) else chain[0]
    message = str(own).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1]
        prefix = f"{type(own).__module__}.{type(own).__qualname__}: "
        message = message[len(prefix):] if message.startswith(prefix) else message
    return " ".join(message.split())


def fail(message: str, prog: str = "convmixer") -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_entry_point(main: Callable[[], T], prog: str = "convmixer") -> T:
    """`main()`, with bad input turned into one error line and exit code 2 (unless CONVMIXER_DEBUG is set)."""
    try:
        return main()
    except (ValueError, MisconfigurationException) as err:
        if debugging():
            raise
        fail(one_line(err), prog)
