"""The signing service: keys and signatures across every configured token.

Plain Python, no gRPC: the servicers in :mod:`signerd.server` unpack requests,
call these methods, and map :mod:`signerd.errors` to status codes; the CLI's
``--local`` ceremonies call them straight on the tokens.

- :mod:`~signerd.service._keyservice`: :class:`KeyService`, which creates,
  deletes and signs, and marks keys used; its lookups and listings are
  :class:`~signerd.service._catalog.KeyCatalog`'s.
- :mod:`~signerd.service._catalog`: finding keys on the tokens by ID, token or
  role, and listing them page by page (:class:`KeyCatalog`).
- :mod:`~signerd.service._certificates`: X.509 certificates of token keys, their
  chains, and certifying one key with another (:class:`KeyCertificates`).
- :mod:`~signerd.service._checkpointkey`: the audit log's checkpoint key, made
  once and usable through no Sign path (:func:`checkpoint_key`).

It imports the token layer, :mod:`signerd.certs`, :mod:`signerd.signing` and
:mod:`signerd.metrics`; never the server, the CLI or the daemon.
"""

from signerd.service._catalog import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from signerd.service._certificates import Certified
from signerd.service._checkpointkey import (
    CHECKPOINT_ROLE,
    NoCheckpointToken,
    checkpoint_key,
    choose_after_serving,
)
from signerd.service._keyservice import KeyService, Signature

__all__ = ["CHECKPOINT_ROLE", "DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "Certified", "KeyService",
           "NoCheckpointToken", "Signature", "checkpoint_key", "choose_after_serving"]
