"""llama-cpp-python's OpenAI-compatible server with the RIPPLE backend active.

``python -m ripple_gguf.server --model m.ripple.gguf [any llama_cpp.server option]`` registers the
backend (``import ripple_gguf``) and then runs ``llama_cpp.server``'s own ``main``: its argument
parsing, settings, config files and app are used unchanged. One addition: ``GET /ripple/stats``
returns the backend's counters, settings and last load as JSON (same API key rule as the other
routes), so a client can see that the plugin served its requests.

Needs the server extra: ``pip install 'ripple-gguf[server]'``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

PROG = "python -m ripple_gguf.server"


def add_ripple_routes(app) -> None:
    """Add ``GET /ripple/stats`` to a ``llama_cpp.server`` app."""
    from fastapi import Depends
    from llama_cpp.server.app import authenticate

    import ripple_gguf

    @app.get("/ripple/stats", dependencies=[Depends(authenticate)], summary="RIPPLE backend counters")
    def ripple_stats() -> dict:
        return {
            "stats": ripple_gguf.stats(),
            "settings": ripple_gguf.settings(),
            "last_load": ripple_gguf.last_load(),
        }


def main(argv: Optional[Sequence[str]] = None) -> None:
    import ripple_gguf  # noqa: F401  registers the backend before the server loads any model

    try:
        import llama_cpp.server.__main__ as stock
    except ImportError as e:
        sys.exit(f"{PROG}: llama-cpp-python's server is not installed ({e}); "
                 "pip install 'ripple-gguf[server]'")

    stock_create_app = stock.create_app

    def create_app(**kwargs):
        app = stock_create_app(**kwargs)
        add_ripple_routes(app)
        return app

    # stock.main() looks create_app up in its module globals and parses sys.argv
    stock.create_app = create_app
    sys.argv = [PROG] + (list(argv) if argv is not None else sys.argv[1:])
    try:
        stock.main()
    finally:
        stock.create_app = stock_create_app


if __name__ == "__main__":
    main()
