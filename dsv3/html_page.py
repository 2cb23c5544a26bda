"""Markdown to one self-contained HTML page: the report card, `dsv3 compare`, the probes and ablations reports.

Images whose paths lie under the page's folder are embedded as base64 data URIs, so the one file can be mailed or
attached to an MLflow run; raw HTML in the text is escaped, never interpreted (it comes from manifests and recipes);
bold words that report a failure are shown in red.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from urllib.parse import unquote

import markdown
from markdown.treeprocessors import Treeprocessor

IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
}


def markdown_to_html(text: str, folder: Path, title: str) -> str:
    """A standalone HTML page of `text`; images (paths relative to `folder`) under `folder` become data URIs, raw
    HTML is escaped."""
    md = markdown.Markdown(extensions=["tables", "toc"])
    md.preprocessors.deregister("html_block")  # text from manifests is shown, never interpreted
    md.inlinePatterns.deregister("html")
    md.treeprocessors.register(_EmbedImages(md, Path(folder).resolve()), "dsv3_embed_images", 5)
    md.treeprocessors.register(_MarkFailures(md), "dsv3_mark_failures", 4)
    body = md.convert(text)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


class _EmbedImages(Treeprocessor):
    """Replace each <img> source (a path relative to the page's folder) by a base64 data URI of the file."""

    def __init__(self, md: markdown.Markdown, folder: Path):
        super().__init__(md)
        self.folder = folder

    def run(self, root) -> None:
        for img in root.iter("img"):
            path = Path(os.path.normpath(self.folder / unquote(img.get("src", ""))))
            mime = IMAGE_TYPES.get(path.suffix.lower())
            if mime and path.is_relative_to(self.folder) and path.is_file():
                img.set("src", f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}")


class _MarkFailures(Treeprocessor):
    """Bold words that report a failure (failed, missing, running, checks failed) get the `bad` class: red."""

    def run(self, root) -> None:
        for strong in root.iter("strong"):
            if (strong.text or "").strip().lower() in ("failed", "checks failed", "missing", "running"):
                strong.set("class", "bad")


_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; }
th { background: #f4f4f4; }
code { background: #f4f4f4; padding: 0 .2rem; }
img { max-width: 100%; border: 1px solid #eee; }
.bad { color: #c62828; }
"""
