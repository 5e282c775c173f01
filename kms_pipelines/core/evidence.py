"""Self-contained evidence bundles for auditors and regulators (P1, T3).

``export`` writes one file: zstandard-compressed JSON lines, in this order

    {"t": "bundle", "format": "kms-evidence/1", "exported_at": …, "source": …}
    {"t": "root_key", "version", "public_key" (base64url), "fingerprint", "state"}   per root version
    {"t": "manifest", "key", "data" (base64url)}      published manifests/root/* objects, if any
    {"t": "checkpoint", "key", "data" (the stored JSON object, verbatim)}
    {"t": "L", "r": [seq, at, key, version, from, to, actor, approvers, ticket, reason, event, prev, hash]}
    {"t": "R", "s": seq, "k": token}
    {"t": "seal", "data": …}   a checkpoint-format document over exactly the exported heads,
                               signed by the active root at export time (absent if the live
                               state failed verification while exporting)
    {"t": "end", "counts": {…}}

``verify_bundle`` needs nothing but the file (no database, no keystore, no object store):
it runs ``checkpoints.verify_streams`` -- the same code the live verifiers run -- over the
bundle's rows, with full RPT signature checks, plus the seal, the public-key manifests and
optionally fingerprints the auditor trusts out of band. Memory stays bounded: rows stream.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import zstandard
from sqlalchemy import select

from . import checkpoints, ledger, rpt
from .clock import parse_time
from .context import KmsContext
from .db.models import Key, KeyVersion
from .keystore import fingerprint as key_fingerprint
from .rpt import RootKey, RptError

FORMAT = "kms-evidence/1"
MANIFEST_PREFIX = "manifests/root/"


@dataclass
class ExportReport:
    path: str
    ledger_entries: int
    rpts: int
    checkpoints: int
    manifests: int
    root_keys: int
    sealed: bool
    live_ok: bool
    problem: str | None = None
    bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _line(fh, record: dict) -> None:
    fh.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n")


def export(ctx: KmsContext, out: str | os.PathLike) -> ExportReport:
    """Write the evidence bundle to ``out`` (atomically: a temporary file, then rename).

    The rows are exported from one consistent database snapshot and, as they stream out,
    checked by the same verifier the auditor will run; the bundle is sealed with the active
    root key only if that check passes (otherwise it is written unsealed and the report
    names the problem, so the auditor still gets the evidence)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    counts = {"root_key": 0, "manifest": 0, "checkpoint": 0, "L": 0, "R": 0}
    store = ctx.objects
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=6).stream_writer(raw) as fh:
        _line(fh, {"t": "bundle", "format": FORMAT, "exported_at": ledger.format_time(ctx.now()),
                   "source": ctx.engine.url.render_as_string(hide_password=True)})
        isolation = {"isolation_level": "REPEATABLE READ"} if ctx.engine.dialect.name == "postgresql" else {}
        with ctx.engine.connect().execution_options(**isolation) as conn, conn.begin():
            keys = {}
            for version, public_key, fp, state in conn.execute(
                    select(KeyVersion.version, KeyVersion.public_key, KeyVersion.fingerprint, KeyVersion.state)
                    .join(Key, Key.id == KeyVersion.key_id).where(Key.name == rpt.ROOT).order_by(KeyVersion.version)):
                if public_key is None:
                    continue
                _line(fh, {"t": "root_key", "version": version, "public_key": rpt.b64url(bytes(public_key)),
                           "fingerprint": fp, "state": state})
                counts["root_key"] += 1
                keys[rpt.make_kid(version, fp)] = RootKey(version, bytes(public_key), fp)
            keys = rpt.key_map(keys.values())
            cps = []
            if store is not None:
                for info in store.list(MANIFEST_PREFIX):
                    _line(fh, {"t": "manifest", "key": info.key, "data": rpt.b64url(store.get_bytes(info.key))})
                    counts["manifest"] += 1
                for info in store.list(ctx.policy.checkpoints.prefix):
                    if not info.key.endswith(".json"):
                        continue
                    data = store.get_bytes(info.key)
                    _line(fh, {"t": "checkpoint", "key": info.key, "data": data.decode("utf-8")})
                    counts["checkpoint"] += 1
                    cps.append(checkpoints.parse(info.key, data))
            batch = ctx.policy.rpt.verify_batch_size

            def ledger_rows():
                for row in ledger.iter_rows(conn, batch):
                    r = list(row)
                    r[1] = ledger.format_time(row[1])
                    _line(fh, {"t": "L", "r": r})
                    counts["L"] += 1
                    yield row

            def rpt_rows():
                for seq, token in rpt.iter_tokens(conn, batch_size=batch):
                    _line(fh, {"t": "R", "s": seq, "k": token})
                    counts["R"] += 1
                    yield seq, token

            lrows, rrows = ledger_rows(), rpt_rows()
            result = checkpoints.verify_streams(cps, keys, lrows, rrows, rpt_signatures=True)
            for _ in lrows:  # a failed check stops early: the evidence still goes out whole
                pass
            for _ in rrows:
                pass
        sealed = False
        if result.ok:
            doc, signature = checkpoints.sign_document(ctx, result.ledger_size, result.ledger_head_hash,
                                                       result.rpt_size, result.rpt_head_hash, ctx.now())
            _line(fh, {"t": "seal", "data": checkpoints.encode(doc, signature).decode("utf-8")})
            sealed = True
        _line(fh, {"t": "end", "counts": counts})
    os.replace(tmp, out)
    return ExportReport(str(out), counts["L"], counts["R"], counts["checkpoint"], counts["manifest"],
                        counts["root_key"], sealed, result.ok, result.problem, out.stat().st_size)


# ---- offline verification -----------------------------------------------------------------

@dataclass
class BundleResult:
    ok: bool
    problem: str | None = None
    area: str | None = None
    first_bad_seq: int | None = None
    ledger_entries: int = 0
    rpts: int = 0
    checkpoints: int = 0
    manifests: int = 0
    sealed: bool = False
    exported_at: str | None = None
    root_keys: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Reader:
    """Records of a bundle, one at a time, with one record of look-ahead."""

    def __init__(self, fh):
        self._lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
        self._peeked = None
        self.line = 0

    def peek(self) -> dict | None:
        if self._peeked is None:
            text = self._lines.readline()
            if not text:
                return None
            self.line += 1
            try:
                self._peeked = json.loads(text)
            except ValueError:
                raise RptError(f"evidence bundle line {self.line} is not JSON (file damaged)") from None
            if not isinstance(self._peeked, dict) or "t" not in self._peeked:
                raise RptError(f"evidence bundle line {self.line} is not a bundle record")
        return self._peeked

    def take(self) -> dict | None:
        rec = self.peek()
        self._peeked = None
        return rec

    def run(self, kind: str) -> Iterator[dict]:
        while (rec := self.peek()) is not None and rec["t"] == kind:
            yield self.take()


def _manifest_problem(key: str, data: bytes, keys_by_version: dict[int, RootKey]) -> str | None:
    """A published manifest that names a root version's fingerprint must agree with the key."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None  # not a JSON manifest: carried as evidence, nothing to cross-check
    docs = doc if isinstance(doc, list) else [doc.get("document", doc)] if isinstance(doc, dict) else []
    for d in docs:
        if not isinstance(d, dict):
            continue
        version, fp = d.get("version"), d.get("fingerprint")
        if isinstance(version, int) and isinstance(fp, str) and (d.get("key") in (None, rpt.ROOT)):
            held = keys_by_version.get(version)
            if held is None or held.fingerprint != fp:
                return (f"manifest {key} publishes fingerprint {fp[:23]}… for root v{version}, "
                        f"which the bundle's public keys do not match")
    return None


def _manifest_chain_problem(docs: list[dict]) -> str | None:
    """The published manifests' own chain (each root fingerprint signed by the previous root),
    checked by the rotation area's offline verifier when it is installed. A previous root
    that was revoked (compromise) does not sign its successor; that is reported by the
    manifest check itself, not treated as tampering here."""
    docs = [d for d in docs if isinstance(d, dict) and d.get("key") == rpt.ROOT and "version" in d]
    if not docs:
        return None
    try:
        from .manifest import verify_documents
    except ImportError:  # pragma: no cover - rotation area absent
        return None
    check = verify_documents(docs)
    if check.ok or "did not sign" in (check.problem or ""):
        return None
    return f"published root manifests do not verify: {check.problem}"


def verify_bundle(path: str | os.PathLike, *, trusted_fingerprints: list[str] | None = None) -> BundleResult:
    """Verify an evidence bundle using only the file (what an auditor runs)."""
    path = Path(path)
    if not path.is_file():
        raise RptError(f"evidence bundle {path} not found")
    res = BundleResult(False)

    def bad(area, problem, seq=None):
        res.ok, res.area, res.problem, res.first_bad_seq = False, area, problem, seq
        return res

    try:
        with open(path, "rb") as fh:
            reader = _Reader(fh)
            head = reader.take()
            if head is None or head.get("t") != "bundle" or head.get("format") != FORMAT:
                return bad("bundle", f"{path.name} is not a {FORMAT} evidence bundle")
            res.exported_at = head.get("exported_at")
            all_keys = []
            for rec in reader.run("root_key"):
                k = RootKey(int(rec["version"]), rpt.b64url_decode(rec["public_key"]), rec["fingerprint"])
                if key_fingerprint(k.public_key) != k.fingerprint:
                    return bad("keys", f"root v{k.version}: public key does not match its fingerprint")
                all_keys.append(k)
                res.root_keys.append({"version": k.version, "fingerprint": k.fingerprint, "state": rec.get("state")})
            keys = rpt.key_map(all_keys)
            by_version = {k.version: k for k in all_keys}
            if trusted_fingerprints:
                held = {k.fingerprint for k in all_keys}
                missing = [fp for fp in trusted_fingerprints if fp not in held]
                if missing:
                    return bad("keys", f"trusted fingerprint {missing[0][:23]}… is not among the bundle's root keys")
            manifest_docs = []
            for rec in reader.run("manifest"):
                res.manifests += 1
                data = rpt.b64url_decode(rec["data"])
                problem = _manifest_problem(rec["key"], data, by_version)
                if problem:
                    return bad("manifest", problem)
                try:
                    manifest_docs.append(json.loads(data))
                except ValueError:
                    pass
            problem = _manifest_chain_problem(manifest_docs)
            if problem:
                return bad("manifest", problem)
            cps = [checkpoints.parse(rec["key"], rec["data"].encode("utf-8")) for rec in reader.run("checkpoint")]
            res.checkpoints = len(cps)

            def ledger_rows():
                for rec in reader.run("L"):
                    r = rec["r"]
                    r[1] = parse_time(r[1])
                    res.ledger_entries += 1
                    yield tuple(r)

            def rpt_rows():
                for rec in ledger_rows():
                    pass  # the ledger verifier may stop early; skip to the tokens
                for rec in reader.run("R"):
                    res.rpts += 1
                    yield rec["s"], rec["k"]

            # The seal comes after the rows; read it first from a second, cheap pass.
            seal = _read_seal(path)
            res.sealed = seal is not None
            result = checkpoints.verify_streams(cps, keys, ledger_rows(), rpt_rows(), rpt_signatures=True, seal=seal)
            if not result.ok:
                return bad(result.area, result.problem, result.first_bad_seq)
            for _ in rpt_rows():
                pass
            while (rec := reader.take()) is not None and rec["t"] != "end":
                if rec["t"] not in ("seal",):
                    return bad("bundle", f"unexpected record {rec['t']!r} at line {reader.line} (bundle reordered)")
            if rec is None:
                return bad("bundle", "the bundle is truncated (no end record)")
            counts = rec.get("counts", {})
            if (counts.get("L"), counts.get("R")) != (res.ledger_entries, res.rpts):
                return bad("bundle", f"the end record counts {counts.get('L')} ledger entries and {counts.get('R')} "
                                     f"RPTs, the bundle holds {res.ledger_entries} and {res.rpts}")
            if seal is None:
                return bad("bundle", "the bundle is not sealed: the live state failed verification at export")
    except zstandard.ZstdError as exc:
        return bad("bundle", f"the bundle does not decompress ({exc.__class__.__name__}): file damaged or truncated")
    except (KeyError, TypeError, IndexError) as exc:
        return bad("bundle", f"malformed record at line {reader.line} ({exc.__class__.__name__})")
    res.ok = True
    return res


def _read_seal(path: Path) -> checkpoints.Checkpoint | None:
    """The seal record (written last, read first): a raw line scan, parsing only the seal."""
    with open(path, "rb") as fh:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
        for text in lines:
            if text.startswith('{"t":"seal"'):
                return checkpoints.parse("evidence seal", json.loads(text)["data"].encode("utf-8"))
    return None
