"""RPT chain verification vs a raw Ed25519 verify loop of the same algorithm (cryptography).

    python benchmarks/bench_rpt.py              # 100k tokens
    python benchmarks/bench_rpt.py --n 20000    # another size
    KMS_BENCH_DATABASE_URL=postgresql://... selects the server (default 127.0.0.1:5432).

Builds a throwaway PostgreSQL database with the KMS schema, three root versions (two
rotations, through core/keys/lifecycle so the ledger holds real activity windows) and a valid
chain of N tokens signed with the root private keys directly (``cryptography``, for speed),
bulk-loaded with COPY. Then, in the same process:

* ``rpt_verify_chain``: ``rpt.verify_chain`` (stream rows from PostgreSQL, parse, check
  seq/prev/kid/window/iat, SHA-256 each token, Ed25519-verify each signature), one process;
* ``rpt_verify_chain_2proc``: the same with ``workers=2`` (seq partitions in two processes,
  each checking its boundary link);
* the baseline both are divided by: a raw loop of ``Ed25519PublicKey.verify`` over the same
  (signature, signing input) pairs, already in memory, in one process.

Each is the best of ``--repeat`` runs (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from benchmarks.harness import emit, peak_rss_mb, result, run_sizes, timed  # noqa: E402
from kms_pipelines.core.foundation import db
from kms_pipelines.core.foundation.canonical import canonical_fast  # noqa: E402
from kms_pipelines.core.foundation.clock import SimulatedClock  # noqa: E402
from kms_pipelines.core.foundation.context import KmsContext  # noqa: E402
from kms_pipelines.core.foundation.keystore.software import SoftwareKeyStore  # noqa: E402
from kms_pipelines.core.foundation.policy import load_policy  # noqa: E402
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import (
    rpt,
    rpt_verify,  # noqa: E402
)

ADMIN = db.normalize_url(os.environ.get("KMS_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def populate(ctx: KmsContext, n: int) -> list[tuple[bytes, bytes, bytes]]:
    """N tokens over three root versions; returns (public key, signature, signing input) per token."""
    lifecycle.bootstrap(ctx)
    pairs, prev, seq = [], rpt.GENESIS_HASH, 0
    thirds = [n // 3, n // 3, n - 2 * (n // 3)]
    conn = ctx.engine.raw_connection()
    try:
        cur = conn.cursor()
        for block, size in enumerate(thirds):
            if block:
                ctx.clock.advance(timedelta(days=90))
                lifecycle.rotate(ctx, "root", reason="cadence")
            with ctx.transaction() as s:
                v = lifecycle.get_version(lifecycle.get_key(s, "root"), None)
            signer = ctx.keystore._signer(v.sign_ref)  # benchmark only: sign in-process for speed
            kid = rpt.make_kid(v.version, v.fingerprint)
            header64 = rpt.b64url(canonical_fast({"alg": rpt.ALG, "kid": kid}))
            base_iat = int(ctx.now().timestamp()) + 1
            with cur.copy("COPY rpts (seq, token, kid, iat, subject, prev_hash, token_hash) FROM STDIN") as copy:
                for i in range(size):
                    seq += 1
                    iat = base_iat + i // 100
                    payload = {
                        "seq": seq,
                        "prev": prev,
                        "iat": iat,
                        "subject": f"issuer-{seq % 97}",
                        "claims": {"deal": f"D-{seq}", "amount": str(seq * 10)},
                    }
                    data = (header64 + "." + rpt.b64url(canonical_fast(payload))).encode("ascii")
                    sig = signer.sign(data)
                    token = data.decode() + "." + rpt.b64url(sig)
                    h = rpt.token_hash(token)
                    copy.write_row((seq, token, kid, datetime.fromtimestamp(iat, UTC), payload["subject"], prev, h))
                    pairs.append((bytes(v.public_key), sig, data))
                    prev = h
            conn.commit()
            ctx.clock.set(datetime.fromtimestamp(base_iat + size // 100 + 1, UTC))
    finally:
        conn.close()
    return pairs


def raw_loop(pairs) -> float:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys = {pk: Ed25519PublicKey.from_public_bytes(pk) for pk in {p for p, _, _ in pairs}}

    def loop():
        for pk, sig, data in pairs:
            keys[pk].verify(sig, data)

    return timed(loop)


def child(n: int, repeat: int) -> None:
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    name = f"kms_bench_rpt_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN).set(database=name).render_as_string(hide_password=False)
    home = Path(tempfile.mkdtemp(prefix="bench-rpt-"))
    engine = db.make_engine(url)
    try:
        db.upgrade(engine)
        ctx = KmsContext(
            engine=engine,
            keystore=SoftwareKeyStore(home / "keys", secrets.token_bytes(32)),
            policy=load_policy(),
            clock=SimulatedClock(T0),
            home=home,
            actor="bench",
        )
        pairs = populate(ctx, n)
        outcome, ones, twos, bases = {}, [], [], []
        for _ in range(repeat):  # interleaved, so a shared machine's load hits all three alike
            ones.append(timed(lambda: outcome.__setitem__("r", rpt_verify.verify_chain(ctx, against_checkpoint=False))))
            assert outcome["r"].ok and outcome["r"].count == n, outcome["r"]
            twos.append(
                timed(
                    lambda: outcome.__setitem__("r", rpt_verify.verify_chain(ctx, workers=2, against_checkpoint=False))
                )
            )
            assert outcome["r"].ok and outcome["r"].count == n, outcome["r"]
            bases.append(raw_loop(pairs))
        one, two, baseline = min(ones), min(twos), min(bases)
        verify_peak = peak_rss_mb()
        rec = result(
            "rpt_verify_chain",
            n,
            one,
            baseline,
            workers=1,
            cpus=os.cpu_count(),
            baseline="raw Ed25519PublicKey.verify loop over the same (sig, input) pairs, in memory, 1 process",
            source="PostgreSQL (streamed)",
            root_versions=3,
        )
        rec["peak_rss_mb"] = verify_peak
        emit(rec)
        rec2 = result(
            "rpt_verify_chain_2proc",
            n,
            two,
            baseline,
            workers=2,
            cpus=os.cpu_count(),
            speedup_vs_1proc=round(one / two, 3),
            baseline="raw Ed25519PublicKey.verify loop over the same (sig, input) pairs, in memory, 1 process",
            source="PostgreSQL (streamed)",
            root_versions=3,
        )
        rec2["peak_rss_mb"] = verify_peak
        emit(rec2)
    finally:
        engine.dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.n, args.repeat)
        return
    run_sizes(__file__, [args.n] if args.n else [100_000], ["--repeat", str(args.repeat)])


if __name__ == "__main__":
    main()
