"""``servekit proxy``: one OpenAI-compatible endpoint in front of many servers (nodes).

registry (the nodes and their state file), strategies (which node serves a request), health (checks
and circuit breakers), forward (passing a request through to a node), metrics, app (the routes).
"""
