"""``/docs``: the API reference page is served offline by the gateway itself and reveals nothing on its own."""

from __future__ import annotations

import re

from gateway.api.docs import ASSETS
from gateway.auth.roles import Role
from tests.conftest import Gateway


async def test_docs_page_uses_only_local_assets(gateway: Gateway) -> None:
    """An API page that loads scripts from a CDN (a third party's code next to signing credentials, and
    no page offline): every script, style and image /docs names is one of its own assets, and each is served."""
    response = await gateway.client.get("/docs")
    assert response.status == 200 and response.content_type == "text/html"
    html = await response.text()
    referenced = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert referenced and all(url.startswith("/docs/assets/") for url in referenced), referenced
    assert "//" not in "".join(referenced) and "http" not in html.replace("http-equiv", "")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    for url in referenced:
        asset = await gateway.client.get(url)
        assert asset.status == 200 and len(await asset.read()) > 0, url
    bundle = await (await gateway.client.get("/docs/assets/swagger-ui-bundle.js")).text()
    assert "SwaggerUIBundle" in bundle and len(bundle) > 100_000  # the real Swagger UI, not a stub
    script = await (await gateway.client.get("/docs/assets/docs.js")).text()
    assert 'fetch("/openapi.json"' in script


async def test_docs_page_does_not_open_the_api_document(gateway: Gateway) -> None:
    """The public page as a way around authentication: /openapi.json still needs service.read, and the
    page embeds no part of it."""
    html = await (await gateway.client.get("/docs")).text()
    assert "/v1/" not in html and "paths" not in html
    assert (await gateway.client.get("/openapi.json")).status == 401
    answer = await gateway.client.get("/openapi.json", headers=gateway.auth(Role.BACKEND))
    assert answer.status == 200 and "/docs" in (await answer.json())["paths"]


async def test_docs_assets_come_from_a_fixed_list(gateway: Gateway) -> None:
    """Reading files through the asset route (path traversal, other files of the package): only the
    listed names are served; anything else is 404 problem+json."""
    for name in ("..%2F..%2F..%2Fetc%2Fpasswd", "index.html", "swagger-ui.js.map", "..%2Fdocs.py", "%2E%2E"):
        response = await gateway.client.get(f"/docs/assets/{name}")
        assert response.status == 404, name
        assert response.content_type == "application/problem+json", name
    traversal = await gateway.client.get("/docs/assets/../../gateway/config.py")
    assert traversal.status == 404
    assert set(ASSETS) == {"swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
                           "favicon-32x32.png", "docs.js"}
