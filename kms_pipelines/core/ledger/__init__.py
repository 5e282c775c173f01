"""The tamper-evident records: T3 (immutable ledger), P1 (RPT chain), A3 (audit log chain).

ledger (append, verify, verify_with_policy), ledger_copy (the PostgreSQL COPY verifier),
audit (emit, flush, head, verify), rpt (issue, issue_many), checkpoints (write_checkpoint,
verify: signed checkpoints in WORM storage), rpt_verify (verify_chain, the policy's verifyChain).

Layers inside (lint-imports): rpt_verify > checkpoints > rpt | audit > ledger : ledger_copy.
"""
