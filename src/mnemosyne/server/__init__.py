"""OpenAI-compatible HTTP server: FastAPI app, protocol models, serving logic and launch."""
