"""What both demos' web pages share: a FastAPI app whose pages load nothing from outside the machine (inline script
and style, and a Content-Security-Policy that lets the browser fetch from this server alone), served on
127.0.0.1 by default. FastAPI rather than Gradio: Gradio's pages fetch fonts and scripts from CDNs, which an offline
demo cannot wait for, and a page of our own is small."""
from __future__ import annotations

import io

PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
               "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'")
MAX_UPLOAD_BYTES = 8 * 2**20
MAX_QUERY_CHARS = 500
DEFAULT_HOST = "127.0.0.1"

BASE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
form { display: flex; flex-wrap: wrap; gap: .6em; align-items: end; margin-bottom: 1em; }
label { display: flex; flex-direction: column; font-size: .85em; }
input[type=text] { width: 28em; }
#status { margin: .5em 0; color: #555; min-height: 1.2em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.cell { width: 200px; font-size: .8em; overflow-wrap: anywhere; }
.frame { position: relative; width: 200px; height: 200px; background: #eee; }
.frame img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.box { position: absolute; border: 2px solid #f0f; box-sizing: border-box; }
progress { width: 20em; }
"""


def create_base_app(title: str):
    """A FastAPI app with the page policy on every response."""
    from fastapi import FastAPI
    from starlette.middleware.base import BaseHTTPMiddleware

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    class Policy(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            response = await call_next(request)
            response.headers["Content-Security-Policy"] = PAGE_POLICY
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response

    app.add_middleware(Policy)
    return app


def page(title: str, body: str, script: str) -> str:
    from html import escape
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{BASE_STYLE}</style></head><body><h2>{escape(title)}</h2>{body}"
            f"<script>{script}</script></body></html>")


def png_bytes(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


async def read_upload(upload, limit: int = MAX_UPLOAD_BYTES) -> bytes:
    """The upload's bytes, refused with 413 past `limit` (read in chunks: a huge upload is never held whole)."""
    from fastapi import HTTPException

    data = bytearray()
    while chunk := await upload.read(1 << 16):
        data.extend(chunk)
        if len(data) > limit:
            raise HTTPException(413, f"upload larger than {limit} bytes")
    return bytes(data)


def serve(app, host: str = DEFAULT_HOST, port: int = 7860) -> None:
    import uvicorn
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach this machine can use the demo")
    uvicorn.run(app, host=host, port=port, log_level="warning")
