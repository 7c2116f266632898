"""`llama2 serve`: an OpenAI-compatible HTTP server that batches concurrent requests.

scheduler.py runs continuous batching over KV-cache slots (no HTTP); protocol.py validates OpenAI
request bodies and builds responses; app.py is the Starlette app; metrics.py the Prometheus text.
Starlette and uvicorn are imported only by app.py and the CLI, so the scheduler works without them.
"""
