wrk.method = "POST"
wrk.body = '{"input": 4.0}'
wrk.headers["Content-Type"] = "application/json"
