"""GET /docs: Swagger UI over /openapi.json, its script and style served by the gateway itself from
the swagger-ui-py package (Swagger UI 5, pinned in requirements.lock), so the page works on a machine
without internet. FastAPI's own /docs loads them from a CDN and is blank offline; its /redoc too, so
that one is off."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from router.http_gateway.errors import APIError

FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")   # what the page loads
PREFIX = "/docs/static/"


def static_dir() -> Path | None:
    """The package's Swagger UI files (found without importing it, which would import jinja2 and yaml)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "static"
    return d if all((d / f).is_file() for f in FILES) else None


def add_routes(app: FastAPI) -> None:
    files = static_dir()

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        if files is None:   # the package is missing: the document itself, still offline
            return HTMLResponse(f'<!doctype html><title>{app.title}</title><p>Swagger UI is not installed '
                                f'(pip install swagger-ui-py); the API is described in <a href="{root}'
                                f'{app.openapi_url}">{app.openapi_url}</a>.</p>')
        return get_swagger_ui_html(openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=root + PREFIX + FILES[0], swagger_css_url=root + PREFIX + FILES[1],
                                   swagger_favicon_url=root + PREFIX + FILES[2])

    @app.get(PREFIX + "{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        if files is None or name not in FILES:
            raise APIError(404, f"no such file: {PREFIX}{name}", code="not_found")
        return FileResponse(files / name, headers={"Cache-Control": "public, max-age=86400"})
