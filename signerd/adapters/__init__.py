"""signerd's keys for other tools, each through signerd's gRPC client:
python-tuf and securesystemslib (:mod:`~signerd.adapters.tuf`, also importable as
``signerd.tuf_signer``), cosign's KMS plugin (:mod:`~signerd.adapters.cosign`) and
Notation's signing plugin (:mod:`~signerd.adapters.notation`).

Adapters import :mod:`signerd.client`, :mod:`signerd.keys` and :mod:`signerd.certs`;
never the token layer, the server or the CLI.
"""
