-- wrk script for `make bench`: POST the JSON body given in BENCH_BODY, as an API client would.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
