"""`llama2 serve`: an OpenAI-compatible HTTP server that batches concurrent requests.

scheduler.py runs continuous batching over KV-cache slots (no HTTP); protocol.py parses OpenAI
request bodies (validated by llama2.request); prepare.py readies them off the event loop, grammars
included; routes.py holds the handlers, app.py makes the Starlette app; metrics.py the Prometheus text.
Starlette and uvicorn are imported only by app.py and the CLI, so the scheduler works without them.
"""
