"""``signerd sweep [--remove]``: objects on the configured tokens that
belong to no key, as a process killed in the middle of a write leaves them
(issue 22 §4; :mod:`signerd.token._sweep` says what counts).

It opens each token as a start would, so run it beside a daemon only if
the token is shared that way anyway (SoftHSM's file store, a YubiHSM);
removal looks twice, ``--grace`` seconds apart, and removes only what was
junk both times, so a key another process is generating is left alone.

Exit status: 0 when nothing is left that belongs to no key, 1 when some is
(reported, not removed), 2 for a config or token that cannot be opened.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from signerd import one_line
from signerd.config import load_config
from signerd.errors import SignerdError


def main(path: Path, remove: bool, grace: float) -> int:
    """Sweep every token of the config at ``path``; print one line per
    object that belongs to no key, and a summary per token."""
    if grace < 0 or grace > 600:
        print("signerd: sweep: --grace must be between 0 and 600 seconds", file=sys.stderr)
        return 2
    from signerd.token import Token

    left = 0
    try:
        config = load_config(path)
        os.environ.update(config.environment)  # e.g. SOFTHSM2_CONF, before modules load
        for tc in config.tokens:
            token = Token(tc)
            try:
                token.keys()
                found, gone = token.sweep(remove, grace)
            finally:
                token.close()
            for junk in found:
                print(f"{tc.name}: {junk}")
            if remove:
                print(f"{tc.name}: {len(found)} object(s) belonged to no key; removed {gone}")
                left += len(found) - gone
            else:
                print(f"{tc.name}: {len(found)} object(s) belong to no key"
                      + ("; `signerd sweep --remove` removes them" if found else ""))
                left += len(found)
    except SignerdError as e:
        print(f"signerd: sweep: {one_line(str(e))}", file=sys.stderr)
        return 2
    return 1 if left else 0
