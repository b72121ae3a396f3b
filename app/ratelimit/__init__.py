"""Per-key limits that hold across replicas: requests and tokens per minute, and budgets.

No FastAPI here: the API layer asks `Limiter.reserve` and renders the `Decision`.
"""
