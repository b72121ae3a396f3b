"""The pieces of `make bench`: fake upstream, gateway processes, wrk, TTFT probe, report."""
