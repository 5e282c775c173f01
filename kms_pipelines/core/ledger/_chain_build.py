"""Build script of ``_chain_c``, the ledger verifier's C kernel (cffi, API mode).

Run at install time: setup.py names it in ``cffi_modules``, so ``pip install`` (editable or
not) compiles it with the system's C compiler against OpenSSL's libcrypto (Debian: ``gcc``,
``libssl-dev`` and the Python headers; scripts/lib/env.sh installs them). During development:
``python setup.py build_ext --inplace``. Without it, ``ledger_copy`` runs its pure-Python path
and says so (``VerifyResult.verifier``).

The kernel does, for a COPY text row needing no escape, exactly what the bytes fast path of
``ledger_copy._chain`` does: split the 13 tab-separated fields of ``ledger_copy.COLUMNS_SQL``,
build the RFC 8785 document with the same template, SHA-256 it, compare it with the stored
hash, check the seq order and the prev link, and keep the chain's state (expected seq, prev
hash, count) in a C struct. A row it cannot decide alone (a COPY escape, a byte that JSON must
escape, not 13 fields, a seq that is not plain decimal, an overlong row) stops it with
``KMS_DEFER`` and goes through the Python reference path (``split_line`` and ``document``),
so every result is the Python verifier's.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
#define KMS_OK ...
#define KMS_GAP ...
#define KMS_LINK ...
#define KMS_ALTERED ...
#define KMS_DEFER ...
#define KMS_PREV_MAX ...

typedef struct {
    int64_t expected_seq;
    int64_t count;
    int64_t seq;        /* the seq of the row that stopped the chain (KMS_GAP, KMS_LINK, KMS_ALTERED) */
    int python_only;    /* the expected seq is beyond int64 (kept in Python): every row defers */
    int status;         /* why kms_chain_feed stopped (KMS_OK when it took every row) */
    size_t prev_len;
    char prev[256];     /* the previous entry's stored hash, prev_len bytes */
} kms_chain;

int kms_chain_row(kms_chain *st, const char *row, size_t len);
size_t kms_chain_feed(kms_chain *st, const char *buf, size_t len);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <openssl/sha.h>

#define KMS_OK 0
#define KMS_GAP 1
#define KMS_LINK 2
#define KMS_ALTERED 3
#define KMS_DEFER 4
#define KMS_PREV_MAX 256

typedef struct {
    int64_t expected_seq;
    int64_t count;
    int64_t seq;
    int python_only;
    int status;
    size_t prev_len;
    char prev[256];
} kms_chain;

/* A row longer than this goes to Python: the document (row + at most 16 bytes per field
   for the template's names, quotes and "null") then always fits the stack buffer. */
#define ROW_MAX 7000
#define DOC_MAX 8192

/* Byte classes for the scan: 1 tab, 2 backslash, 3 needs a JSON escape (", controls
   other than tab and newline; as ledger_copy._JSON_ESCAPE), 0 anything else. */
static const unsigned char cls[256] = {
    [0 ... 0x1f] = 3, ['\t'] = 1, ['\n'] = 0 /* never inside a row: it ends one */, ['\\'] = 2, ['"'] = 3,
};

static inline char *put(char *d, const char *s, size_t n) { memcpy(d, s, n); return d + n; }
#define PUTS(d, lit) put((d), (lit), sizeof(lit) - 1)

static inline int is_null(const char *f, size_t n) { return n == 2 && f[0] == '\\' && f[1] == 'N'; }

/* "null" for COPY's NULL, else the field as a JSON string (no escape needed: checked). */
static inline char *put_opt_str(char *d, const char *f, size_t n) {
    if (is_null(f, n)) return PUTS(d, "null");
    *d++ = '"';
    d = put(d, f, n);
    *d++ = '"';
    return d;
}

/* One row (newline included). KMS_OK after updating the state, else why it stopped. */
static int check_row(kms_chain *st, const char *row, size_t rlen) {
    const char *f[13];
    size_t n[13];
    if (st->python_only || rlen < 2 || rlen > ROW_MAX || row[rlen - 1] != '\n') return KMS_DEFER;
    size_t end = rlen - 1, start = 0;
    int k = 0;
    /* approvers (field 0): only COPY escapes matter; it is a JSON text used as it is */
    for (size_t i = 0; i < end; i++) {
        unsigned char c = (unsigned char)row[i];
        unsigned char t = cls[c];
        if (t == 0) continue;
        if (t == 1) {
            if (k == 12) return KMS_DEFER;
            f[k] = row + start; n[k] = i - start; k++; start = i + 1;
        } else if (t == 2) {
            if (row[i + 1] != 'N') return KMS_DEFER; /* i + 1 <= end: the newline at worst */
            i++;
        } else if (k > 0) {
            return KMS_DEFER; /* a JSON escape in a field after approvers */
        }
    }
    if (k != 12) return KMS_DEFER;
    f[12] = row + start; n[12] = end - start;

    /* seq (field 1): plain decimal, as PostgreSQL prints a bigint; anything else goes to
       Python's int() */
    const char *s = f[1];
    size_t sn = n[1], j = 0;
    int neg = 0;
    if (sn && s[0] == '-') { neg = 1; j = 1; }
    if (j == sn || sn - j > 18) return KMS_DEFER;
    int64_t seq = 0;
    for (; j < sn; j++) {
        if (s[j] < '0' || s[j] > '9') return KMS_DEFER;
        seq = seq * 10 + (s[j] - '0');
    }
    if (neg) seq = -seq;
    st->seq = seq;
    if (seq != st->expected_seq) return KMS_GAP;
    if (n[7] != st->prev_len || memcmp(f[7], st->prev, n[7]) != 0) return KMS_LINK;

    /* approvers, actor, at, key, to are NOT NULL: a NULL there is an altered row */
    if (is_null(f[0], n[0]) || is_null(f[2], n[2]) || is_null(f[3], n[3]) || is_null(f[6], n[6])
        || is_null(f[10], n[10]))
        return KMS_ALTERED;
    /* fields: 0 approvers, 1 seq, 2 actor, 3 at, 4 event, 5 from, 6 key, 7 prev, 8 reason,
       9 ticket, 10 to, 11 version, 12 entry_hash (ledger_copy.COLUMNS_SQL) */
    char doc[DOC_MAX];
    char *d = doc;
    d = PUTS(d, "{\"actor\":\""); d = put(d, f[2], n[2]);
    d = PUTS(d, "\",\"approvers\":"); d = put(d, f[0], n[0]);
    d = PUTS(d, ",\"at\":\""); d = put(d, f[3], n[3]);
    d = PUTS(d, "\",\"event\":"); d = put_opt_str(d, f[4], n[4]);
    d = PUTS(d, ",\"from\":"); d = put_opt_str(d, f[5], n[5]);
    d = PUTS(d, ",\"key\":\""); d = put(d, f[6], n[6]);
    d = PUTS(d, "\",\"prev\":\""); d = put(d, f[7], n[7]);
    d = PUTS(d, "\",\"reason\":"); d = put_opt_str(d, f[8], n[8]);
    d = PUTS(d, ",\"seq\":"); d = put(d, f[1], n[1]);
    d = PUTS(d, ",\"ticket\":"); d = put_opt_str(d, f[9], n[9]);
    d = PUTS(d, ",\"to\":\""); d = put(d, f[10], n[10]);
    d = PUTS(d, "\",\"version\":");
    if (is_null(f[11], n[11])) d = PUTS(d, "null"); else d = put(d, f[11], n[11]);
    *d++ = '}';

    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256_CTX ctx; /* not SHA256(): in OpenSSL 3 that looks the algorithm up by name per call */
    SHA256_Init(&ctx);
    SHA256_Update(&ctx, doc, (size_t)(d - doc));
    SHA256_Final(md, &ctx);
    if (n[12] != 2 * SHA256_DIGEST_LENGTH) return KMS_ALTERED;
    static const char hex[] = "0123456789abcdef";
    const char *h = f[12];
    for (int b = 0; b < SHA256_DIGEST_LENGTH; b++) {
        if (h[2 * b] != hex[md[b] >> 4] || h[2 * b + 1] != hex[md[b] & 15]) return KMS_ALTERED;
    }
    if (seq == INT64_MAX) return KMS_DEFER; /* its successor's seq would overflow: Python's int */
    memcpy(st->prev, h, n[12]);
    st->prev_len = n[12];
    st->expected_seq = seq + 1;
    st->count++;
    return KMS_OK;
}

/* One COPY text row as psycopg2's copy_expert hands it to ``write`` (newline included).
   KMS_OK after advancing the chain, else why it stopped (KMS_DEFER: check it in Python). */
int kms_chain_row(kms_chain *st, const char *row, size_t len) {
    return check_row(st, row, len);
}

/* A block of COPY text rows, each ending in its newline (COPY escapes a newline in data, so
   every newline byte ends a row). Returns the bytes consumed: all (status KMS_OK), or up to
   the row that stopped the chain, which status names. One call per block: the GIL is
   released once per block, not per row. */
size_t kms_chain_feed(kms_chain *st, const char *buf, size_t len) {
    size_t pos = 0;
    while (pos < len) {
        const char *row = buf + pos;
        const char *nl = memchr(row, '\n', len - pos);
        size_t rlen = nl ? (size_t)(nl - row) + 1 : len - pos;
        int r = check_row(st, row, rlen);
        if (r != KMS_OK) {
            st->status = r;
            return pos;
        }
        pos += rlen;
    }
    st->status = KMS_OK;
    return pos;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "kms_pipelines.core.ledger._chain_c",
    SOURCE,
    libraries=["crypto"],
    # SHA256_Init/Update/Final are deprecated in OpenSSL 3 in favour of EVP, whose per-call
    # set-up costs more than hashing a 300-byte document; they are still exported and run the
    # same SHA-NI code.
    define_macros=[("OPENSSL_API_COMPAT", "0x10100000L"), ("OPENSSL_SUPPRESS_DEPRECATED", "1")],
    extra_compile_args=["-O2"],
    # No compiler or headers on some machine: the install goes on without the kernel (the
    # verifier then runs its pure-Python path and logs that it does) instead of failing.
    optional=True,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
