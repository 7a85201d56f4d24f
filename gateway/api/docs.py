"""``/docs``: the API reference page — Swagger UI from the ``swagger-ui-bundle-v2`` package (Apache-2.0,
its LICENSE in that package's metadata), served by the gateway itself: no CDN, works offline.

The page is public and holds nothing: it reads ``/openapi.json``, which still needs ``service.read``,
with a key the reader types in. Assets come from a fixed list, never from a path the client names.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from gateway.api.call import Call
from gateway.api.endpoints import Endpoint
from gateway.errors import NotFound

#: name under /docs/assets/ → (file, content type). The Swagger UI files, and our page's script.
ASSETS: dict[str, tuple[Traversable, str]] = {
    "swagger-ui.css": (swagger_ui_path / "swagger-ui.css", "text/css"),
    "swagger-ui-bundle.js": (swagger_ui_path / "swagger-ui-bundle.js", "text/javascript"),
    "swagger-ui-standalone-preset.js": (swagger_ui_path / "swagger-ui-standalone-preset.js", "text/javascript"),
    "favicon-32x32.png": (swagger_ui_path / "favicon-32x32.png", "image/png"),
    "docs.js": (resources.files("gateway.api") / "static" / "docs.js", "text/javascript"),
}

#: Only this origin's own scripts, styles and images; the page can reach nothing else.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; "
                           "base-uri 'none'")

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>ecny-gateway API reference</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
</head>
<body>
  <form id="credentials">
    <p>The API document needs an API key or session token with <code>service.read</code>
      (kept in this tab only).</p>
    <input id="token" type="password" autocomplete="off" placeholder="ecny_… or ecnys_…" required>
    <button type="submit">Show the API</button>
    <p id="message" role="alert"></p>
  </form>
  <div id="reference"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/docs/assets/swagger-ui-standalone-preset.js"></script>
  <script src="/docs/assets/docs.js"></script>
</body>
</html>
"""


def _headers() -> dict[str, str]:
    return {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache"}


async def page(call: Call) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html", charset="utf-8", headers=_headers())


async def asset(call: Call) -> web.Response:
    name = call.request.match_info["name"]
    if name not in ASSETS:
        raise NotFound(f"no asset {name!r}")
    file, content_type = ASSETS[name]
    return web.Response(body=file.read_bytes(), content_type=content_type, headers=_headers())


ENDPOINTS = [
    Endpoint("GET", "/docs", page, "The API reference page (Swagger UI, served offline)", None, "service",
             response_media="text/html"),
    Endpoint("GET", "/docs/assets/{name}", asset, "A file of the API reference page (fixed list)", None, "service",
             response_media="*/*"),
]
