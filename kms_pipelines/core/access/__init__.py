"""Access controls: A1 (least privilege), A2 (FIDO2 + TOTP, workload identities), A3 (anomaly
detection), A4 (dual authorization, notifications).

principals (enroll, roles and permissions, approvals, workload tokens), approval_requests
(pending manual operations), console_auth (FIDO2 + TOTP console sign-in), audited_keystore
(every keystore operation audited, A3), anomalies (detect, refresh_anomalies, review),
crosscheck (ledger vs audit vs keystore), notifications (notify_policy_event,
notify_manual_operation, deliveries_by_ref: delivery evidence).
"""
