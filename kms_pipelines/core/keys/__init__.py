"""Keys and their lifecycle: P1-P2 (root and service keys), R1-R2 (rotation cadence),
T1 (retention, archive vault), T4 (dependents confirm before revoke).

lifecycle (create, rotate, revoke, destroy: the state machine), rotation (reconcile per
class, partner notices), manual (manual_rotate under dual control), service_keys
(credentials, app secrets, audit signatures), manifest (root public-key manifests),
dependents (confirmations), retention (destroy guards, retire_expired), vault (archive
copies under dual control), forensic (forensic retrieval and drill).
"""
