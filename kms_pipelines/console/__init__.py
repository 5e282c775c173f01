"""`kms console`: the browser door to the KMS (web layer only; logic lives in core)."""
