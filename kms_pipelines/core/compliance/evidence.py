"""Self-contained evidence bundles for auditors and regulators (P1, T3).

``export`` writes one file: one zstandard frame (with its content checksum) of JSON lines,
in this order

    {"t": "bundle", "format": "kms-evidence/2", "exported_at": …, "source": …}
    {"t": "root_key", "version", "public_key" (base64url), "fingerprint", "state"}   per root version
    {"t": "manifest", "key", "data" (base64url)}      every published manifests/root/v<N>.json
    {"t": "checkpoint", "key", "data" (the stored JSON object, verbatim)}
    {"t": "L", "r": [seq, at, key, version, from, to, actor, approvers, ticket, reason, event, prev, hash]}
    {"t": "R", "s": seq, "k": token}
    {"t": "seal", "data": …}   signed by the active root at export time (absent if the live
                               state failed verification while exporting)
    {"t": "end", "counts": {…}}

The seal is a checkpoint document (the exported ledger and RPT heads) extended with the
SHA-256 of every byte before the seal line, the digest of each header/key/manifest/
checkpoint record (so a refusal can name the record), and the count of every record kind;
one Ed25519 signature covers all of it.

``verify_bundle`` needs nothing but the file (no database, no keystore, no object store).
Trust starts from fingerprints pinned out of band (``--trust``): a root key counts only if
it is pinned or its manifest carries the signature of a root already trusted (old signs
new). Every signature in the bundle -- checkpoints, RPTs, the seal -- must come from such a
key, inside that key's activity window in the ledger. Rows stream through
``checkpoints.verify_streams``, the same code the live verifiers run; memory stays bounded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zstandard
from sqlalchemy import select

from ..foundation.clock import parse_time
from ..foundation.context import KmsContext
from ..foundation.db.models import PENDING, Key, KeyVersion
from ..foundation.keystore import fingerprint as key_fingerprint
from ..keys import manifest
from ..ledger import checkpoints, ledger, rpt
from ..ledger.rpt import RootKey, RptError

FORMAT = "kms-evidence/2"
SEAL_FORMAT = "kms-evidence-seal/1"
MANIFEST_PREFIX = manifest.PREFIX
META = ("bundle", "root_key", "manifest", "checkpoint")  # records listed one by one in the seal
KINDS = (*META, "L", "R")


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


def encode_record(record: dict) -> bytes:
    """The one encoding of a bundle record (the verifier refuses any other spelling)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def _label(record: dict) -> str:
    t = record["t"]
    if t == "root_key":
        return f"v{record['version']}"
    return record["key"] if t in ("manifest", "checkpoint") else t


class _Writer:
    """Writes records and keeps what the seal signs: content hash, per-record digests, counts."""

    def __init__(self, fh):
        self.fh, self.content, self.records = fh, hashlib.sha256(), []
        self.counts = {k: 0 for k in KINDS}

    def __call__(self, record: dict) -> None:
        data = encode_record(record)
        self.fh.write(data)
        self.content.update(data)
        if record["t"] in META:
            self.records.append([record["t"], _label(record), hashlib.sha256(data).hexdigest()])
        self.counts[record["t"]] += 1

    def seal_extra(self) -> dict:
        return {
            "bundle_format": FORMAT,
            "content_sha256": self.content.hexdigest(),
            "records": self.records,
            "counts": dict(self.counts),
        }


def export(ctx: KmsContext, out: str | os.PathLike) -> ExportReport:
    """Write the evidence bundle to ``out`` (atomically: a temporary file, then rename).

    Root manifests not yet published are published first (idempotent): a bundle without the
    manifest of every root key cannot be verified from a pinned root. The rows are exported
    from one consistent database snapshot and, as they stream out, checked by the same
    verifier the auditor will run; the bundle is sealed with the active root key only if
    that check passes (otherwise it is written unsealed and the report names the problem,
    so the auditor still gets the evidence)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    store = ctx.objects
    problem = None
    if store is not None:
        try:
            manifest.publish_pending(ctx)
        except manifest.ManifestError as exc:
            problem = f"root manifests could not be published: {exc}"
    try:
        with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=6, write_checksum=True).stream_writer(raw) as fh:
            line = _Writer(fh)
            line(
                {
                    "t": "bundle",
                    "format": FORMAT,
                    "exported_at": ledger.format_time(ctx.now()),
                    "source": ctx.engine.url.render_as_string(hide_password=True),
                }
            )
            isolation = {"isolation_level": "REPEATABLE READ"} if ctx.engine.dialect.name == "postgresql" else {}
            with ctx.engine.connect().execution_options(**isolation) as conn, conn.begin():
                keys = {}
                for version, public_key, fp, state in conn.execute(
                    select(KeyVersion.version, KeyVersion.public_key, KeyVersion.fingerprint, KeyVersion.state)
                    .join(Key, Key.id == KeyVersion.key_id)
                    .where(Key.name == rpt.ROOT)
                    .order_by(KeyVersion.version)
                ):
                    if public_key is None or state == PENDING:
                        continue  # a pending root has signed nothing and has no manifest yet
                    if fp is None:  # every generated root version records its fingerprint with its key
                        raise RptError(f"root v{version} has a public key but no fingerprint; cannot export it")
                    line(
                        {
                            "t": "root_key",
                            "version": version,
                            "public_key": rpt.b64url(bytes(public_key)),
                            "fingerprint": fp,
                            "state": state,
                        }
                    )
                    keys[rpt.make_kid(version, fp)] = RootKey(version, bytes(public_key), fp)
                keys = rpt.key_map(keys.values())
                cps = []
                if store is not None:
                    for info in store.list(MANIFEST_PREFIX):
                        line({"t": "manifest", "key": info.key, "data": rpt.b64url(store.get_bytes(info.key))})
                    for info in store.list(ctx.policy.checkpoints.prefix):
                        if not info.key.endswith(".json"):
                            continue
                        data = store.get_bytes(info.key)
                        line({"t": "checkpoint", "key": info.key, "data": data.decode("utf-8")})
                        cps.append(checkpoints.parse(info.key, data))
                batch = ctx.policy.rpt.verify_batch_size

                def ledger_rows():
                    for row in ledger.iter_rows(conn, batch):
                        r = list(row)
                        r[1] = ledger.format_time(row[1])
                        line({"t": "L", "r": r})
                        yield row

                def rpt_rows():
                    for seq, token in rpt.iter_tokens(conn, batch_size=batch):
                        line({"t": "R", "s": seq, "k": token})
                        yield seq, token

                lrows, rrows = ledger_rows(), rpt_rows()
                result = checkpoints.verify_streams(cps, keys, lrows, rrows, rpt_signatures=True)
                for _ in lrows:  # a failed check stops early: the evidence still goes out whole
                    pass
                for _ in rrows:
                    pass
            problem = problem or result.problem
            sealed = False
            if problem is None:
                doc, signature = checkpoints.sign_document(
                    ctx,
                    result.ledger_size,
                    result.ledger_head_hash,
                    result.rpt_size,
                    result.rpt_head_hash,
                    ctx.now(),
                    extra=line.seal_extra(),
                )
                fh.write(encode_record({"t": "seal", "data": _encode_seal(doc, signature)}))
                sealed = True
            fh.write(encode_record({"t": "end", "counts": line.counts}))
    except BaseException:  # a refused or failed export leaves no partial bundle behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    c = line.counts
    return ExportReport(
        str(out),
        c["L"],
        c["R"],
        c["checkpoint"],
        c["manifest"],
        c["root_key"],
        sealed,
        problem is None,
        problem,
        out.stat().st_size,
    )


def _encode_seal(doc: dict, signature: bytes) -> str:
    return json.dumps(
        {"format": SEAL_FORMAT, "document": doc, "signature": rpt.b64url(signature)},
        separators=(",", ":"),
        sort_keys=True,
    )


_SEAL_EXTRA = {"bundle_format", "content_sha256", "records", "counts"}


def _parse_seal(text: str) -> checkpoints.Seal:
    try:
        obj = json.loads(text)
        doc = dict(obj["document"])
        if obj.get("format") != SEAL_FORMAT or set(doc) != set(checkpoints.FIELDS) | _SEAL_EXTRA:
            raise ValueError("unexpected fields")
        extra = {k: doc.pop(k) for k in _SEAL_EXTRA}
        if (
            extra["bundle_format"] != FORMAT
            or not isinstance(extra["records"], list)
            or not isinstance(extra["counts"], dict)
            or set(extra["counts"]) != set(KINDS)
        ):
            raise ValueError("unexpected seal contents")
        seal = checkpoints.Seal("the evidence seal", **doc, signature=obj["signature"], extra=extra)
        if not all(type(getattr(seal, f)) is int for f in ("ledger_size", "rpt_size")):
            raise ValueError("sizes must be integers")
        parse_time(seal.at)
        return seal
    except (ValueError, KeyError, TypeError) as exc:
        raise RptError(f"the evidence seal is malformed ({exc.__class__.__name__})") from None


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
    anchored: bool = False  # trust started from a fingerprint the caller pinned
    anchors: list = field(default_factory=list)
    exported_at: str | None = None
    root_keys: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Reader:
    """Records of a bundle, one at a time (raw line kept), with one record of look-ahead.
    Reads across frames so bytes appended after the bundle's frame are seen, not ignored."""

    def __init__(self, fh):
        self._lines = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True))
        self._peeked = None
        self.line = 0
        self.content = hashlib.sha256()  # every byte before the seal line

    def peek(self) -> tuple[dict, bytes] | None:
        if self._peeked is None:
            raw = self._lines.readline()
            if not raw:
                return None
            self.line += 1
            try:
                rec = json.loads(raw)
            except ValueError:
                raise RptError(f"evidence bundle line {self.line} is not JSON (file damaged)") from None
            if not isinstance(rec, dict) or rec.get("t") not in (*KINDS, "seal", "end"):
                raise RptError(f"evidence bundle line {self.line} is not a bundle record")
            if raw != encode_record(rec):
                raise RptError(
                    f"evidence bundle line {self.line} ({rec['t']} record) is not in the bundle's "
                    f"encoding (re-written by hand)"
                )
            if rec["t"] not in ("seal", "end"):
                self.content.update(raw)
            self._peeked = (rec, raw)
        return self._peeked

    def take(self) -> tuple[dict, bytes] | None:
        item = self.peek()
        self._peeked = None
        return item

    def run(self, kind: str):
        while (item := self.peek()) is not None and item[0]["t"] == kind:
            yield self.take()


def _check_frame(path: Path) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(zstandard.FRAME_HEADER_SIZE_MAX if hasattr(zstandard, "FRAME_HEADER_SIZE_MAX") else 18)
    try:
        params = zstandard.get_frame_parameters(head)
    except zstandard.ZstdError:
        return f"{path.name} is not a zstd-compressed evidence bundle"
    if not params.has_checksum:
        return "the bundle's zstd frame carries no content checksum (rewritten outside `kms evidence export`)"
    return None


def _read_seal(path: Path) -> checkpoints.Seal | None:
    """The seal record (written last, needed first): a raw line scan that also checks every
    frame's content checksum (ZstdError on damage)."""
    seal = None
    with open(path, "rb") as fh:
        lines = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True))
        for raw in lines:
            if raw.startswith(b'{"t":"seal"'):
                if seal is not None:
                    raise RptError("the bundle holds two seals")
                seal = _parse_seal(json.loads(raw)["data"])
    return seal


def verify_bundle(path: str | os.PathLike, *, trusted_fingerprints: list[str] | None = None) -> BundleResult:
    """Verify an evidence bundle using only the file (what an auditor runs).

    With ``trusted_fingerprints`` the bundle must reach every signing key from one of them
    (``anchored``); without, the oldest root manifest in the bundle is the anchor, which
    proves only that the bundle is self-consistent."""
    path = Path(path)
    if not path.is_file():
        raise RptError(f"evidence bundle {path} not found")
    res = BundleResult(False)

    def bad(area, problem, seq=None):
        res.ok, res.area, res.problem, res.first_bad_seq = False, area, problem, seq
        return res

    problem = _check_frame(path)
    if problem:
        return bad("bundle", problem)
    reader = None
    try:
        seal = _read_seal(path)
        res.sealed = seal is not None
        with open(path, "rb") as fh:
            reader = _Reader(fh)
            item = reader.take()
            if item is None or item[0].get("t") != "bundle" or item[0].get("format") != FORMAT:
                return bad("bundle", f"{path.name} is not a {FORMAT} evidence bundle")
            res.exported_at = item[0].get("exported_at")
            meta = [item]  # every record the seal lists one by one, in file order
            all_keys = []
            for rec, raw in reader.run("root_key"):
                meta.append((rec, raw))
                k = RootKey(int(rec["version"]), rpt.b64url_decode(rec["public_key"]), rec["fingerprint"])
                if key_fingerprint(k.public_key) != k.fingerprint:
                    return bad(
                        "keys", f"root_key v{k.version} (line {reader.line}): public key does not match its fingerprint"
                    )
                all_keys.append(k)
                res.root_keys.append({"version": k.version, "fingerprint": k.fingerprint, "state": rec.get("state")})
            docs = {}
            for rec, raw in reader.run("manifest"):
                meta.append((rec, raw))
                res.manifests += 1
                try:
                    doc = json.loads(rpt.b64url_decode(rec["data"]))
                except ValueError:
                    doc = None
                problem = manifest.document_problem(doc)
                if problem is None and rec["key"] != manifest.object_key(doc["version"]):
                    problem = f"stored as {rec['key']}, not {manifest.object_key(doc['version'])}"
                if problem is None and doc["version"] in docs:
                    problem = f"a second manifest of root v{doc['version']}"
                if problem:
                    return bad("manifest", f"manifest {rec['key']} (line {reader.line}) does not verify: {problem}")
                docs[doc["version"]] = doc
            cp_items = list(reader.run("checkpoint"))
            meta.extend(cp_items)

            # 1. trust: pinned fingerprints, then old-signs-new manifests only
            anchors = set(trusted_fingerprints or [])
            res.anchored = bool(anchors)
            if not anchors and docs:
                anchors = {docs[min(docs)]["fingerprint"]}
            res.anchors = sorted(anchors)
            for fp in trusted_fingerprints or []:
                if not any(d["fingerprint"] == fp for d in docs.values()):
                    return bad(
                        "keys",
                        f"trusted fingerprint {fp[:23]}… is not the fingerprint of any root manifest in the bundle",
                    )
            reached = manifest.reached_from(list(docs.values()), anchors)
            refused = {}
            for k in all_keys:
                doc = docs.get(k.version)
                if doc is None:
                    return bad(
                        "manifest",
                        f"root_key v{k.version}: the bundle holds no manifest of root v{k.version} "
                        f"(root manifests missing), so it cannot be traced to a pinned root",
                    )
                if doc["fingerprint"] != k.fingerprint or base64.b64decode(doc["public_key"]) != k.public_key:
                    return bad(
                        "manifest",
                        f"root_key v{k.version}: its public key differs from manifest {manifest.object_key(k.version)}",
                    )
                if k.version not in reached:
                    refused[k.kid] = (
                        f"signed by root v{k.version} ({k.fingerprint[:23]}…), which is not the pinned "
                        f"root nor reached from it by old-signs-new root manifests"
                    )
            keys = rpt.key_map(all_keys)

            # 2. the seal: signed by a reached key, over exactly these records
            if seal is not None:
                if seal.kid not in keys:
                    return bad("seal", "the evidence seal is signed by a key that is not among the bundle's root keys")
                if seal.kid in refused:
                    return bad("seal", f"the evidence seal: {refused[seal.kid]}")
                problem = checkpoints.signature_problem(seal, keys)
                if problem:
                    return bad(
                        "seal",
                        problem.replace("checkpoint the evidence seal", "the evidence seal").replace(
                            "checkpoint altered", "seal altered"
                        ),
                    )
                listed = seal.extra["records"]
                for i, (rec, raw) in enumerate(meta):
                    entry = [rec["t"], _label(rec), hashlib.sha256(raw).hexdigest()]
                    if i >= len(listed) or listed[i] != entry:
                        return bad(
                            rec["t"] if rec["t"] != "bundle" else "bundle",
                            f"{rec['t']} record {entry[1]} (line {i + 1}) is not the record the seal signed "
                            f"(added, altered or reordered)",
                        )
                if len(listed) > len(meta):
                    kind, label, _ = listed[len(meta)]
                    return bad(kind, f"{kind} record {label} that the seal signed is missing from the bundle")

            cps = [checkpoints.parse(rec["key"], rec["data"].encode("utf-8")) for rec, _ in cp_items]
            res.checkpoints = len(cps)

            # 3. the rows: chains, checkpoints, windows, signatures (the live verifier's code)
            def ledger_rows():
                for rec, _ in reader.run("L"):
                    r = rec["r"]
                    r[1] = parse_time(r[1])
                    res.ledger_entries += 1
                    yield tuple(r)

            def rpt_rows():
                for _ in ledger_rows():
                    pass  # the ledger verifier may stop early; skip to the tokens
                for rec, _ in reader.run("R"):
                    res.rpts += 1
                    yield rec["s"], rec["k"]

            result = checkpoints.verify_streams(
                cps, keys, ledger_rows(), rpt_rows(), rpt_signatures=True, seal=seal, refused=refused
            )
            if not result.ok:
                return bad(result.area, result.problem, result.first_bad_seq)
            for _ in rpt_rows():
                pass
            item = reader.take()
            if item is not None and item[0]["t"] == "seal":
                item = reader.take()
            if item is None:
                return bad("bundle", "the bundle is truncated (no end record)")
            if item[0]["t"] != "end":
                return bad("bundle", f"unexpected record {item[0]['t']!r} at line {reader.line} (bundle reordered)")
            end_line = reader.line
            if reader.take() is not None:
                return bad("bundle", f"records after the end record (line {end_line}): bytes appended to the bundle")
            counts = item[0].get("counts", {})
            held = {
                "bundle": 1,
                "root_key": len(all_keys),
                "manifest": res.manifests,
                "checkpoint": len(cps),
                "L": res.ledger_entries,
                "R": res.rpts,
            }
            if counts != held:
                diff = next(k for k in KINDS if counts.get(k) != held[k])
                return bad(
                    "bundle",
                    f"the end record counts {counts.get(diff)} {diff} record(s), the bundle holds {held[diff]}",
                )
            if seal is None:
                return bad("bundle", "the bundle is not sealed: the live state failed verification at export")
            if seal.extra["counts"] != held:
                return bad("seal", "the record counts differ from those the seal signed")
            if seal.extra["content_sha256"] != reader.content.hexdigest():
                return bad("seal", "the bundle's content differs from the SHA-256 the seal signed")
    except zstandard.ZstdError as exc:
        return bad("bundle", f"the bundle does not decompress ({exc}): file damaged or truncated")
    except RptError as exc:
        return bad("bundle", str(exc))
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
        return bad("bundle", f"malformed record at line {reader.line if reader else 0} ({exc.__class__.__name__})")
    res.ok = True
    return res
