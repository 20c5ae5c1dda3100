"""Serving: an OpenAI-compatible HTTP API with continuous batching (`app.py`, `batcher.py`) and a chat page
(`page.html`). `lmforge serve --model M` runs it; `pip install -e ".[serve]"` brings FastAPI and uvicorn."""
