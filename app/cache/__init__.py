"""The two-tier response cache (L1 in-process, L2 Redis)."""
