"""The Swagger UI at /docs, and the icon every page asks for.

Documentation pages share their origin with the console, so a script they load could act as a
signed-in user. Their assets come from a CDN at exact versions, each with a Subresource Integrity
hash: a browser refuses a file whose bytes are not the ones pinned here. To move to a new version,
take the file from its npm package and write its `sha384-` digest beside its URL.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

router = APIRouter(include_in_schema=False)

SWAGGER_JS = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.36.0/swagger-ui-bundle.js"
SWAGGER_CSS = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.36.0/swagger-ui.css"
ASYNCAPI_JS = "https://unpkg.com/@asyncapi/react-component@3.1.5/browser/standalone/index.js"
ASYNCAPI_CSS = "https://unpkg.com/@asyncapi/react-component@3.1.5/styles/default.min.css"
INTEGRITY = {
    SWAGGER_JS: "sha384-fUpRgC19yPykTqzdrUbdAg8NTiu16NEKf9U12J+IJWCg8/1mEI8f2+PEIz60Wyd+",
    SWAGGER_CSS: "sha384-z/AtSaOHGn5MJ5auAHXUypohywlIWLBZo1jeGmhdpVIbCnFhxAH92cwdV41oyINc",
    ASYNCAPI_JS: "sha384-8wbjPojoZcmtwWk+Smcb9q18OIVmLY6REqp4MnkZK6xd9+FLztcl6wwP447XxJ+V",
    ASYNCAPI_CSS: "sha384-oo9RoQcacP++XdMX6CjTucTvASEORHX3chFik0/V2kHcsHiVboGyWZztGeq/0bum",
}
FAVICON = Path(__file__).parents[1] / "console" / "static" / "favicon.svg"


def with_integrity(html: str) -> str:
    """`html` with each pinned asset's tag carrying its hash (and CORS, which SRI needs)."""
    for url, digest in INTEGRITY.items():
        for attribute in ("src", "href"):
            html = html.replace(f'{attribute}="{url}"',
                                f'{attribute}="{url}" integrity="{digest}" crossorigin="anonymous"')
    return html


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    page = get_swagger_ui_html(openapi_url="/openapi.json", title="User segmentation service - API docs",
                               swagger_js_url=SWAGGER_JS, swagger_css_url=SWAGGER_CSS,
                               swagger_favicon_url="/favicon.ico", oauth2_redirect_url=None)
    return HTMLResponse(with_integrity(page.body.decode()))


@router.get("/favicon.ico")
async def favicon() -> FileResponse:
    return FileResponse(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})
