"""`pyllm serve`: an OpenAI-compatible HTTP server over one model (pip install "pyllm[serve]").

create_app(load, name) builds the FastAPI app (app.py) around a continuous-batching engine
(pyllm.engine); serve() runs it with uvicorn, bound to loopback unless told otherwise. Not the
batching itself, nor the model: this layer speaks HTTP and text.
"""

from __future__ import annotations

from pyllm.serve.app import create_app, uvicorn

__all__ = ["create_app", "serve"]


def serve(load, name: str, host: str = "127.0.0.1", port: int = 8000, api_key=None, engine_config=None,
          log_level: str = "info") -> None:
    """Runs the server until interrupted; load() -> LLM runs once the socket listens."""
    app = create_app(load, name, api_key, engine_config)   # a clear error without the serve extra
    uvicorn.run(app, host=host, port=port, log_level=log_level)
