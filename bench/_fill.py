"""A SoftHSM token holding N signerd keys, built once and kept for later runs.

The keys are what the daemon's CreateKey makes, because signerd's own
``Token.generate`` makes them (bench/_token.py ``generate_keys``): layout 2,
three objects a key (the private key, the public key, the metadata object,
whose value records purpose ``raw``: the bench signs opaque payloads),
ecdsa-p256, 16-byte random CKA_IDs.

Filling one token from one process takes 25-30 ms a key on this machine
(10,000 keys: about 5 minutes), flat in N. To use every core, the token is
initialised once, its directory copied into ``shards`` copies, and each copy
filled by its own process; then the object files of every copy are put in
one directory. That is sound for SoftHSM's file store (2.6.1,
``src/lib/object_store``): a token is a directory holding ``token.object``
(label, PINs, the wrapped token key), a ``generation`` counter and one
``<uuid>.object`` file (with its ``.lock``) per object; objects are named by
random UUIDs and indexed from the directory listing when the module starts,
and private attributes are encrypted under the token key that every copy
shares. Nothing ties an object file to the directory it was made in. The
result is then opened with signerd's ``Token``, which must list exactly N
well-formed layout 2 keys of purpose raw, or the build fails.

The token is kept under ``<cache>/many-raw-l2-<N>`` (``bench/.cache`` is
gitignored) with ``done.json`` (N, the layout, seconds taken, a sample of
key IDs); :func:`cached_token` returns a fresh copy of it for each use, since
a run writes to it (signing marks keys used).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench import _token

LAYOUT = 2  # signerd.token._layout's layout 2; part of the cache's name
ALGORITHM = "ecdsa-p256"
SAMPLE = 400  # key IDs kept in done.json for the scale bench to sign with


def cache_name(count: int) -> str:
    """The cache directory's name for a token of ``count`` keys."""
    return f"many-raw-l{LAYOUT}-{count}"


def _token_dir(hsm_dir: Path) -> Path:
    [where] = list((hsm_dir / "tokens").iterdir())
    return where


def verify(module: str, conf: Path, label: str, pin_file: Path, count: int) -> dict[str, Any]:
    """Open the token with signerd's Token (in this, a child process), list
    its keys, and check they are ``count`` layout 2 ecdsa-p256 keys of
    purpose raw, unused. Returns the listing's seconds and a sample of key
    IDs. Raises RuntimeError."""
    token = _token._token(module, conf, label, pin_file, 1)
    try:
        t0 = time.monotonic()
        keys = token.keys()
        seconds = time.monotonic() - t0
    finally:
        token.close()
    wrong = [k.key_id for k in keys if k.layout != LAYOUT or k.purpose != "raw"
             or k.algorithm.name != ALGORITHM or k.used or k.meta is None]
    if len(keys) != count or wrong:
        raise RuntimeError(f"built token lists {len(keys)} keys (wanted {count}); "
                           f"{len(wrong)} not layout {LAYOUT} raw unused {ALGORITHM}")
    ids = sorted(k.key_id for k in keys)
    step = max(1, len(ids) // SAMPLE)
    return {"listing_seconds": round(seconds, 3), "sample": ids[::step][:SAMPLE]}


def build(module: str, target: Path, count: int, shards: int) -> dict[str, Any]:
    """Build a token of ``count`` keys in directory ``target`` (which must
    not exist) with ``shards`` processes; see the module's doc."""
    from bench.run import LABEL, SPAWN, Hsm, child

    work = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    base = Hsm.create(work / "base", module)
    shards = max(1, min(shards, count))
    copies = [base.copy_to(work / f"shard-{i}") for i in range(shards)]
    sizes = [count // shards + (1 if i < count % shards else 0) for i in range(shards)]
    firsts = [sum(sizes[:i]) for i in range(shards)]
    with ProcessPoolExecutor(max_workers=shards, mp_context=SPAWN) as pool:
        made = list(pool.map(_token.generate_keys, [module] * shards, [c.conf for c in copies],
                             [LABEL] * shards, [c.pin_file for c in copies], sizes,
                             [ALGORITHM] * shards, firsts))
    generated = time.monotonic() - t0
    into = _token_dir(base.dir)
    for c in copies:
        for f in _token_dir(c.dir).iterdir():
            if f.suffix in (".object", ".lock") and f.name not in ("token.object", "token.lock") \
                    and not (into / f.name).exists():
                shutil.copy2(f, into / f.name)
    checked = child(verify, module, base.conf, LABEL, base.pin_file, count)
    for c in copies:
        shutil.rmtree(c.dir)
    info = {"keys": count, "layout": LAYOUT, "algorithm": ALGORITHM, "purpose": "raw",
            "shards": shards, "generate_seconds": round(generated, 1),
            "shard_seconds": [round(m["seconds"], 1) for m in made],
            "total_seconds": round(time.monotonic() - t0, 1), **checked}
    (base.dir / "done.json").write_text(json.dumps(info, indent=1) + "\n")
    base.dir.rename(target)
    shutil.rmtree(work, ignore_errors=True)
    return info


def cached_token(module: str, cache: Path, count: int, copy_to: Path,
                 shards: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A fresh copy (in ``copy_to``) of the cached token of ``count`` keys,
    built first if the cache lacks it; returns (Hsm, done.json's content)."""
    from bench.run import Hsm, log

    cached = cache / cache_name(count)
    if not (cached / "done.json").exists():
        shutil.rmtree(cached, ignore_errors=True)
        n = shards or os.cpu_count() or 1
        log(f"building a token of {count} keys in {cached} with {n} processes (once)")
        info = build(module, cached, count, n)
        log(f"built {count} keys in {info['total_seconds']:.0f}s "
            f"(generation {info['generate_seconds']:.0f}s, listing "
            f"{info['listing_seconds']:.1f}s)")
    info = json.loads((cached / "done.json").read_text())
    return Hsm(cached, module).copy_to(copy_to), info


def main(argv: list[str] | None = None) -> int:
    """``python -m bench._fill N [N ...]``: build the cached tokens now."""
    import argparse

    from bench.run import CACHE
    from signerd import embedded

    p = argparse.ArgumentParser(prog="python -m bench._fill", description=main.__doc__)
    p.add_argument("counts", type=int, nargs="+", help="keys on each token")
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--shards", type=int, default=None, help="processes (default: CPUs)")
    a = p.parse_args(argv)
    module = embedded.softhsm_module()
    for n in a.counts:
        cached = a.cache / cache_name(n)
        if (cached / "done.json").exists():
            print(f"{cached}: already built")
            continue
        shutil.rmtree(cached, ignore_errors=True)
        info = build(module, cached, n, a.shards or os.cpu_count() or 1)
        print(json.dumps({k: v for k, v in info.items() if k != "sample"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
