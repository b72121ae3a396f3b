"""`make soak`: the long steady load (scripts/soak.py) and its parts."""
