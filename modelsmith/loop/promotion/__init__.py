"""Policy gate, promotion requests, approvals, rollback, evidence bundle."""
