"""What the two local pages (`serve.py`: rate and receive; `collect.py`: collect ratings) share:
the page frame, score parsing, listing the images a page may show, and running the server."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

from flask import render_template_string
from markupsafe import Markup
from werkzeug.serving import make_server

from reward_models.errors import UserError
from reward_models.image_files import IMAGE_SUFFIXES, has_image_suffix

FRAME = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto; padding: 0 1rem;
       color: #111827; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem; }
.message { padding: .6rem .8rem; border-radius: .3rem; margin: .8rem 0; }
.error { background: #fee2e2; border: 1px solid #dc2626; }
.ok { background: #dcfce7; border: 1px solid #16a34a; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; }
.card { border: 1px solid #d1d5db; border-radius: .3rem; padding: .5rem; text-align: center; }
.card img, .gallery img { width: 128px; height: 128px; image-rendering: pixelated; display: block; }
.card input[type=number] { width: 5rem; margin-top: .3rem; }
.gallery { display: flex; flex-wrap: wrap; gap: .4rem; }
table { border-collapse: collapse; } td, th { padding: .2rem .6rem; text-align: left; }
.bar { display: inline-block; height: .7rem; background: #2563eb; vertical-align: middle; }
button { font-size: 1rem; padding: .4rem 1rem; margin-top: .8rem; }
.muted { color: #6b7280; font-size: .9rem; }
</style></head>
<body>{{ body }}</body></html>"""


def page(title: str, body: str, status: int = 200, **context):
    """A full HTML page: `body` is a Jinja template rendered with `context` (autoescaped)."""
    inner = render_template_string(body, **context)
    return render_template_string(FRAME, title=title, body=Markup(inner)), status


def parse_score(raw: str | None, low: float, high: float, what: str) -> float:
    """A score typed into a form: a finite number in [low, high], else a UserError saying so."""
    if raw is None or not raw.strip():
        raise UserError(f"{what}: no score given; enter a number from {low:g} to {high:g}")
    try:
        value = float(raw.strip())
    except ValueError:
        raise UserError(
            f"{what}: {raw.strip()[:20]!r} is not a number; enter a number from {low:g} to {high:g}"
        ) from None
    if not math.isfinite(value) or not low <= value <= high:
        raise UserError(
            f"{what}: {value:g} is out of range; enter a number from {low:g} to {high:g}"
        )
    return value


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursively, sorted), each resolved and inside `folder`:
    a link that leads outside it is left out, so a page never serves a file from elsewhere."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise UserError(f"{folder}: no such folder of images")
    found = []
    for path in sorted(root.rglob("*")):
        if not has_image_suffix(path) or not path.is_file():
            continue
        real = path.resolve()
        if real.is_relative_to(root) and not any(
            p.startswith(".") for p in real.relative_to(root).parts
        ):
            found.append(real)
    if not found:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    return found


def relative_name(path: Path, folder: Path) -> str:
    """`path` relative to `folder`, with forward slashes (what the rating tables store)."""
    return Path(os.path.relpath(path, folder)).as_posix()


class Server:
    """A Flask app on a werkzeug server in a background thread (threaded, so a page can poll
    while images are generated); `port=0` picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.server = make_server(host, port, app, threaded=True)
        self.host, self.port = host, self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Server:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)
