"""Seeded simulations of the virtuous cycle (no network, no I/O)."""
