"""The index application at ``/``: which nations this cluster serves, and where their docs are."""

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

index_app = FastAPI(title="kas-ray", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
@serve.ingress(index_app)
class KasIndex:
    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = urls

    @index_app.get("/")
    async def root(self) -> JSONResponse:
        return JSONResponse({"service": "kas-ray", "nations": self.urls,
                             "openapi": {n: f"{u}/docs" for n, u in self.urls.items()}})

    @index_app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @index_app.get("/docs")
    async def docs(self) -> HTMLResponse:
        items = "".join(f'<li><a href="{u}/docs">{n}</a> — <code>{u}</code></li>' for n, u in self.urls.items())
        return HTMLResponse(f"<html><body><h1>kas-ray</h1><p>Each nation's KAS has its own OpenAPI:</p>"
                            f"<ul>{items}</ul></body></html>")


def build_index(args: dict[str, dict[str, str]]) -> serve.Application:
    """Application builder: ``args = {"urls": {nation: url}}``."""
    return KasIndex.bind(dict(args.get("urls", {})))
