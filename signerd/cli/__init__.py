"""``signerctl``, the command-line client: argv, terminals and printing.

:mod:`signerd.cli.signerctl` holds the key, sign, verify and audit verbs,
:mod:`signerd.cli.trust` the ``trust`` verbs, and :mod:`signerd.cli._util`
what they share. This is the only package that knows argv and terminals on the
client side; it may import every other package but the server and the daemon.
"""

from signerd.cli.signerctl import main

__all__ = ["main"]
