"""Evidence bundles trust one pinned root (issue 12, cases 1 and 2), on real PostgreSQL.

The attacker here holds the exported file, can rewrite any of it, and has an Ed25519 key of
their own -- but not the genuine root's private key. Every forgery is refused and the
refusal names the first record that cannot be verified."""

import base64
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kms_pipelines.core.compliance import evidence
from kms_pipelines.core.foundation.canonical import canonical_bytes
from kms_pipelines.core.foundation.clock import parse_time
from kms_pipelines.core.foundation.keystore import fingerprint
from kms_pipelines.core.keys import lifecycle, manifest
from kms_pipelines.core.ledger import ledger, rpt
from tests.test_evidence import _make_bundle, _offline_env


@pytest.fixture
def genuine(kms_pg, tmp_path):
    kms, path = _make_bundle(kms_pg, tmp_path)
    with kms.transaction() as s:
        pinned = lifecycle.get_version(lifecycle.get_key(s, "root"), 1).fingerprint
    return kms, path, pinned


def read_records(path):
    with open(path, "rb") as fh:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8").read()
    return [json.loads(line) for line in text.splitlines()]


def write_records(path, records, *, checksum=True):
    body = b"".join(evidence.encode_record(r) for r in records)
    path.write_bytes(zstandard.ZstdCompressor(write_checksum=checksum).compress(body))


def _relink(rows, start_index):
    prev = rows[start_index - 1]["r"][12] if start_index else ledger.GENESIS_HASH
    for rec in rows[start_index:]:
        r = rec["r"]
        r[11] = prev
        doc = ledger.entry_document(
            r[0], parse_time(r[1]), r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8], r[9], r[10], prev
        )
        r[12] = prev = ledger.entry_hash(doc)


def forge(path, out, *, manifests="drop"):
    """The issue's attack: rotate in an own root (v3), rewrite a ledger row, drop what no
    longer matches (checkpoints; the root manifests unless told otherwise), re-seal."""
    own = Ed25519PrivateKey.generate()
    pub = own.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    fp = fingerprint(pub)
    records = [r for r in read_records(path) if r["t"] not in ("seal", "end", "checkpoint")]
    keys = [r for r in records if r["t"] == "root_key"]
    keys[-1]["state"] = "rotated"
    own_key = {"t": "root_key", "version": 3, "public_key": rpt.b64url(pub), "fingerprint": fp, "state": "active"}
    records.insert(records.index(keys[-1]) + 1, own_key)
    if manifests == "drop":
        records = [r for r in records if r["t"] != "manifest"]
    elif manifests == "own-v3":  # a manifest for v3 whose "previous" signature is the attacker's own
        v2 = json.loads(
            rpt.b64url_decode(next(r for r in records if r["t"] == "manifest" and r["key"].endswith("v2.json"))["data"])
        )
        doc = {
            "format": manifest.FORMAT,
            "key": "root",
            "version": 3,
            "kid": manifest.kid(3),
            "algorithm": "Ed25519",
            "public_key": base64.b64encode(pub).decode(),
            "fingerprint": fp,
            "valid_from": v2["valid_from"],
            "previous": {
                "version": 2,
                "kid": manifest.kid(2),
                "fingerprint": v2["fingerprint"],
                "status": "rotated",
                "signature": base64.b64encode(own.sign(manifest.signed_message(fp))).decode(),
            },
        }
        last_manifest = [r for r in records if r["t"] == "manifest"][-1]
        records.insert(
            records.index(last_manifest) + 1,
            {"t": "manifest", "key": manifest.object_key(3), "data": rpt.b64url(canonical_bytes(doc))},
        )
    rows = [r for r in records if r["t"] == "L"]
    target = next(i for i, r in enumerate(rows) if r["r"][2] != "root")
    rows[target]["r"][6], rows[target]["r"][8] = "alice (approved: bob, carol)", "CHG-FORGED"
    last_at = parse_time(rows[-1]["r"][1])
    newest_token = [r for r in records if r["t"] == "R"][-1]["k"]
    iat = rpt.decode(newest_token)[1]["iat"]
    when = max(last_at, datetime.fromtimestamp(iat, UTC)) + timedelta(seconds=5)
    n = rows[-1]["r"][0]
    extra_rows = [
        {
            "t": "L",
            "r": [
                n + 1,
                ledger.format_time(when),
                "root",
                2,
                "active",
                "rotated",
                "mallory",
                "[]",
                None,
                "rotation",
                None,
                "",
                "",
            ],
        },
        {
            "t": "L",
            "r": [
                n + 2,
                ledger.format_time(when),
                "root",
                3,
                None,
                "active",
                "mallory",
                "[]",
                None,
                "rotation",
                None,
                "",
                "",
            ],
        },
    ]
    records.insert(records.index(rows[-1]) + 1, extra_rows[0])
    records.insert(records.index(rows[-1]) + 2, extra_rows[1])
    rows = [r for r in records if r["t"] == "L"]
    _relink(rows, target)
    buf = io.BytesIO()
    writer = evidence._Writer(buf)
    for r in records:
        writer(r)
    tokens = [r for r in records if r["t"] == "R"]
    doc = {
        **writer.seal_extra(),
        "ledger_size": len(rows),
        "ledger_head_hash": rows[-1]["r"][12],
        "rpt_size": tokens[-1]["s"],
        "rpt_head_hash": rpt.token_hash(tokens[-1]["k"]),
        "at": ledger.format_time(when + timedelta(seconds=1)),
        "kid": rpt.make_kid(3, fp),
    }
    seal = {"t": "seal", "data": evidence._encode_seal(doc, own.sign(canonical_bytes(doc)))}
    write_records(out, records + [seal, {"t": "end", "counts": writer.counts}])
    return fp


def _cli(args, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "kms_pipelines.cli", *args],
        env=_offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_genuine_bundle_verifies_anchored_to_the_pinned_root(genuine, tmp_path):
    _, path, pinned = genuine
    result = evidence.verify_bundle(path, trusted_fingerprints=[pinned])
    assert result.ok and result.anchored and result.manifests == 2 and result.sealed, result
    proc = _cli(["evidence", "verify", str(path), "--trust", pinned], tmp_path)
    assert proc.returncode == 0 and "anchored to the pinned root" in proc.stdout, proc.stdout + proc.stderr
    unpinned = _cli(["evidence", "verify", str(path)], tmp_path)
    assert unpinned.returncode == 0 and "NOT anchored" in unpinned.stdout


def test_case1_forged_bundle_with_own_root_and_dropped_manifests_is_refused(genuine, tmp_path):
    _, path, pinned = genuine
    forged = tmp_path / "FORGED"
    forge(path, forged)
    result = evidence.verify_bundle(forged, trusted_fingerprints=[pinned])
    assert not result.ok and result.area == "keys"
    assert "trusted fingerprint" in result.problem and "is not the fingerprint of any root manifest" in result.problem
    proc = _cli(["evidence", "verify", str(forged), "--trust", pinned], tmp_path)
    assert proc.returncode == 1 and "evidence FAILS (keys): trusted fingerprint" in proc.stderr, proc.stderr
    assert "verifies" not in proc.stdout
    # unpinned, the dropped manifests alone refuse it, naming the first key without one
    result = evidence.verify_bundle(forged)
    assert not result.ok and result.problem.startswith("root_key v1: the bundle holds no manifest of root v1")


def test_case1_forged_bundle_keeping_genuine_manifests_is_refused(genuine, tmp_path):
    _, path, pinned = genuine
    forged = tmp_path / "FORGED"
    forge(path, forged, manifests="keep")
    result = evidence.verify_bundle(forged, trusted_fingerprints=[pinned])
    assert not result.ok and result.area == "manifest"
    assert result.problem.startswith("root_key v3: the bundle holds no manifest of root v3 (root manifests missing)")


def test_case1_forged_manifest_for_own_root_is_not_reached_from_the_pin(genuine, tmp_path):
    _, path, pinned = genuine
    forged = tmp_path / "FORGED"
    fp = forge(path, forged, manifests="own-v3")
    result = evidence.verify_bundle(forged, trusted_fingerprints=[pinned])
    assert not result.ok and result.area == "seal"
    assert f"signed by root v3 ({fp[:23]}…), which is not the pinned root nor reached from it" in result.problem
    # pinning the attacker's key as well is the only way it verifies: trust is the caller's choice
    assert evidence.verify_bundle(forged, trusted_fingerprints=[pinned, fp]).ok


def _edit(path, edit):
    records = read_records(path)
    edit(records)
    write_records(path, records)


def _set(kind, field, value):
    def edit(records):
        next(r for r in records if r["t"] == kind)[field] = value

    return edit


def _drop_checkpoint(records):
    records.remove(next(r for r in records if r["t"] == "checkpoint"))


@pytest.mark.parametrize(
    "edit,area,fragment",
    [
        (
            _set("bundle", "exported_at", "2020-01-01T00:00:00.000000Z"),
            "bundle",
            "bundle record bundle (line 1) is not the record the seal signed",
        ),
        (
            _set("bundle", "source", "postgresql://elsewhere/db"),
            "bundle",
            "bundle record bundle (line 1) is not the record the seal signed",
        ),
        (
            _set("root_key", "state", "revoked"),
            "root_key",
            "root_key record v1 (line 2) is not the record the seal signed",
        ),
        (
            _set("manifest", "data", rpt.b64url(b"not json at all")),
            "manifest",
            "manifest manifests/root/v1.json (line 4) does not verify: not a JSON object",
        ),
        (_drop_checkpoint, "checkpoint", "is not the record the seal signed"),
    ],
)
def test_case2_unsigned_fields_are_now_signed(genuine, edit, area, fragment, tmp_path):
    _, path, pinned = genuine
    _edit(path, edit)
    result = evidence.verify_bundle(path, trusted_fingerprints=[pinned])
    assert not result.ok and result.area == area and fragment in result.problem, result


def test_case2_flipped_compressed_byte_and_checksumless_frame_are_refused(genuine, tmp_path):
    _, path, pinned = genuine
    data = bytearray(path.read_bytes())
    assert zstandard.get_frame_parameters(bytes(data)).has_checksum
    flipped = tmp_path / "flipped"
    for offset in range(len(data) // 2, len(data) // 2 + 8):  # any one byte: every flip is refused
        data2 = bytearray(data)
        data2[offset] ^= 0x01
        flipped.write_bytes(bytes(data2))
        result = evidence.verify_bundle(flipped, trusted_fingerprints=[pinned])
        assert not result.ok and result.area == "bundle", (offset, result)
    write_records(flipped, read_records(path), checksum=False)
    result = evidence.verify_bundle(flipped, trusted_fingerprints=[pinned])
    assert not result.ok and "carries no content checksum" in result.problem
    appended = tmp_path / "appended"
    appended.write_bytes(
        path.read_bytes()
        + zstandard.ZstdCompressor(write_checksum=True).compress(evidence.encode_record({"t": "end", "counts": {}}))
    )
    result = evidence.verify_bundle(appended, trusted_fingerprints=[pinned])
    assert not result.ok and "records after the end record" in result.problem


def test_case2_end_record_counts_must_match(genuine, tmp_path):
    _, path, pinned = genuine
    _edit(path, lambda records: records[-1]["counts"].__setitem__("checkpoint", 7))
    result = evidence.verify_bundle(path, trusted_fingerprints=[pinned])
    assert not result.ok and "the end record counts 7 checkpoint record(s), the bundle holds 2" in result.problem


def test_a_reencoded_record_is_named(genuine, tmp_path):
    _, path, pinned = genuine
    records = read_records(path)
    body = b"".join(evidence.encode_record(r) for r in records)
    body = body.replace(b'{"t":"R","s":3,', b'{"t": "R","s":3,', 1)
    path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(body))
    result = evidence.verify_bundle(path, trusted_fingerprints=[pinned])
    assert not result.ok and "(R record) is not in the bundle's encoding" in result.problem
