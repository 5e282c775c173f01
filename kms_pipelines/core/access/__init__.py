"""Access controls: A1 (least privilege), A2 (FIDO2 + TOTP, workload identities), A3 (anomaly
detection), A4 (dual authorization, notifications).

principals (prove_principal, roles and permissions, request_approval, approve,
consume_approvals), enrolment (init_principals, enroll_principal, change_roles,
remove_principal), tokens (issue_workload_token, verify_workload_token, WorkloadIdentity),
webauthn (the FIDO2 relying party: register_ceremony_keys, begin_step_up, verify_approval),
approval_requests (pending manual operations), console_auth (console sign-in, sessions,
registration links, begin_approval), audited_keystore
(every keystore operation audited, A3), anomalies (detect, refresh_anomalies, review),
crosscheck (ledger vs audit vs keystore), notifications (notify_policy_event,
notify_manual_operation, deliveries_by_ref: delivery evidence).
"""
