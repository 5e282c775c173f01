"""Responses to events: R2 (compromise, tenant rotation, CI secret exposure), P4 and R4
(break-glass escrow), R1 and B4 follow-ups (overdue notices).

events (report, list), compromise (respond), escrow (seal, open, status), overdue
(notify_overdue: partner acknowledgements and drill follow-ups past due).
"""
