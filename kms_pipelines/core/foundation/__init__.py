"""Foundation: the boundaries every policy section stands on; no clause of its own.

clock (injectable time), canonical (RFC 8785 bytes), policy (assets/policy.yaml), db (models,
engine, migrations, append-only triggers), keystore (software / PKCS#11 backends), objectstore
(local / S3 WORM), transports (SMTP, Slack, outbox delivery), retry (dependency faults),
limits (input limits), partitions and batching (parallel verifiers, sweep batch sizes),
context (KmsContext, kms_home), state (require_initialized), worker (KMS_ROLE=worker preflight),
nightly_steps (nightly_step: where each area registers its nightly step).

Imports nothing above it (checked by lint-imports, .importlinter).
"""
