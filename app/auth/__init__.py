"""Virtual API keys: issued by operators, presented by clients, resolved without the
database on the hot path."""
