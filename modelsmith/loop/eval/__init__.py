"""Running an eval, its service (eval.* methods), diagnose."""
