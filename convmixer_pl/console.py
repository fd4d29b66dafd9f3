"""What a person reads: `convmixer: ...` notes (from the job's first process) and the one-line errors of every
entry point: a bad input (a project `ValueError`, or Lightning's `MisconfigurationException`) ends in
`convmixer[ tool]: error: <message>` and exit code 2; `CONVMIXER_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def say(message: str) -> None:
    """One `convmixer: <message>` line on stderr, from the job's first process."""
    print(f"convmixer: {message}", file=sys.stderr, flush=True)


def debugging() -> bool:
    return bool(os.environ.get("CONVMIXER_DEBUG"))


def one_line(err: BaseException) -> str:
    """The message of the project's own error behind `err`, on one line: jsonargparse wraps errors raised while
    building the model or data module, and a DataLoader worker re-raises with its traceback in the message."""
    chain: list[BaseException] = []
    while err is not None and len(chain) < 20:
        chain.append(err)
        err = err.__cause__ or err.__context__
    fallback = chain[-1] if "\n" in str(chain[0]) and isinstance(chain[-1], ValueError) else chain[0]
    own = next((e for e in chain if type(e).__module__.startswith("convmixer_pl")), fallback)
    message = str(own).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1]
        message = message.removeprefix(f"{type(own).__module__}.{type(own).__qualname__}: ")
    return " ".join(message.split())


def fail(message: str, prog: str = "convmixer") -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_entry_point(main: Callable[[], Any], prog: str = "convmixer") -> Any:
    """`main()`, with bad input turned into one error line and exit code 2 (unless CONVMIXER_DEBUG is set)."""
    try:
        return main()
    except (ValueError, MisconfigurationException) as err:
        if debugging():
            raise
        fail(one_line(err), prog)
