"""dsv3/html_page.py: one self-contained page — images under its folder embedded, none from outside it, raw HTML
shown as text, failure words marked."""

import base64
import re

from dsv3.html_page import markdown_to_html

PNG = b"\x89PNG\r\n\x1a\n not really an image"


def test_images_under_the_folder_are_embedded_and_others_are_not(tmp_path):
    folder = tmp_path / "run"
    (folder / "stage").mkdir(parents=True)
    (folder / "stage" / "loss curve.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(b"outside")
    page = markdown_to_html("![a](stage/loss%20curve.png)\n\n![b](../secret.png)\n\n![c](stage/gone.png)", folder, "t")
    sources = re.findall(r'<img alt="[abc]" src="([^"]*)"', page)
    assert sources[0] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert sources[1:] == ["../secret.png", "stage/gone.png"]  # left as links: outside the folder, or missing


def test_raw_html_is_text_and_the_title_is_escaped(tmp_path):
    page = markdown_to_html("<script>alert(1)</script>\n\n| a |\n|---|\n| <b>x</b> |\n", tmp_path, "a <b> title")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<td>&lt;b&gt;x&lt;/b&gt;</td>" in page
    assert "<title>a &lt;b&gt; title</title>" in page
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page


def test_failure_words_in_bold_are_marked(tmp_path):
    page = markdown_to_html("**failed** and **missing** but **done**", tmp_path, "t")
    assert '<strong class="bad">failed</strong>' in page and '<strong class="bad">missing</strong>' in page
    assert "<strong>done</strong>" in page
