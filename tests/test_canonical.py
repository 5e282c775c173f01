import random
import string
from datetime import UTC

import rfc8785

from kms_pipelines.core.foundation.canonical import canonical_bytes, canonical_fast
from kms_pipelines.core.ledger.ledger import entry_document


def _random_text(rng: random.Random) -> str:
    alphabet = string.printable + '\u00e9\u4e2d\U0001f511\x00\x01\x1f\u2028"\\/'
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))


def test_fast_encoder_matches_rfc8785_on_ledger_shaped_documents():
    rng = random.Random(8785)
    for _ in range(3000):
        doc = entry_document(
            rng.randint(1, 10**12),
            "2026-01-01T00:00:00.000000Z",
            _random_text(rng),
            rng.choice([None, rng.randint(0, 10**6)]),
            rng.choice([None, "active", _random_text(rng)]),
            _random_text(rng),
            _random_text(rng),
            [_random_text(rng) for _ in range(rng.randint(0, 3))],
            rng.choice([None, _random_text(rng)]),
            rng.choice([None, _random_text(rng)]),
            rng.choice([None, _random_text(rng)]),
            "ab" * 32,
        )
        assert canonical_fast(doc) == rfc8785.dumps(doc), doc


def test_canonical_bytes_is_rfc8785():
    assert canonical_bytes({"b": 1, "a": [True, None, "x"]}) == b'{"a":[true,null,"x"],"b":1}'


def test_verifier_row_encoding_matches_the_document_encoding():
    from datetime import datetime, timedelta

    from kms_pipelines.core.foundation.canonical import canonical_fast
    from kms_pipelines.core.ledger.ledger import row_canonical

    rng = random.Random(42)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    for _ in range(2000):
        approvers = sorted(_random_text(rng) for _ in range(rng.randint(0, 3)))
        fields = (
            rng.randint(1, 10**9),
            t0 + timedelta(microseconds=rng.randint(0, 10**12)),
            _random_text(rng),
            rng.choice([None, rng.randint(1, 99)]),
            rng.choice([None, _random_text(rng)]),
            _random_text(rng),
            _random_text(rng),
            approvers,
            rng.choice([None, _random_text(rng)]),
            rng.choice([None, _random_text(rng)]),
            rng.choice([None, _random_text(rng)]),
            "cd" * 32,
        )
        expected = rfc8785.dumps(entry_document(*fields))
        row = list(fields)
        row[7] = canonical_fast(approvers).decode()
        assert row_canonical(*row) == expected
        # SQLite hands back naive UTC datetimes; they must encode the same way.
        row[1] = fields[1].replace(tzinfo=None)
        assert row_canonical(*row) == expected
