"""GET / and /static/*: the browser playground (static files shipped in gateway/static, no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent.parent / "static"
FILES = {path.name: path for path in STATIC.iterdir() if path.is_file()}
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}

router = APIRouter()


def _file(name: str) -> FileResponse:
    path = FILES[name]
    # no-cache: the page always matches the gateway that serves it after an upgrade
    return FileResponse(path, media_type=TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return _file("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    if name not in FILES:  # only the shipped files: no path is ever joined from the request
        raise HTTPException(status_code=404, detail=f"no static file {name!r}")
    return _file(name)
