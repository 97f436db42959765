"""Plain text from HTML documentation pages (Sphinx and DocBook output)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

# Elements whose whole subtree is page chrome, not prose.
_SKIP_TAGS = {"script", "style", "head", "nav", "footer", "noscript", "svg"}
# Sphinx and DocBook class names of navigation bars, sidebars and tables of contents.
_SKIP_CLASSES = {
    "sphinxsidebar",
    "related",
    "footer",
    "navheader",
    "navfooter",
    "toc",
    "headerlink",
    "mobile-nav",
    "breadcrumbs",
}
_BLOCK_TAGS = {
    "p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "pre",
    "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "section", "hr",
}  # fmt: skip
_VOID_TAGS = {
    "br",
    "hr",
    "img",
    "meta",
    "link",
    "input",
    "wbr",
    "col",
    "area",
    "base",
    "source",
}


class _Extractor(HTMLParser):
    """Collects text outside skipped subtrees, marking block boundaries with newlines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_tag: str | None = None
        self._skip_depth = 0
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag and tag not in _VOID_TAGS:
                self._skip_depth += 1
            return
        classes = set((dict(attrs).get("class") or "").split())
        role = dict(attrs).get("role")
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES or role == "navigation":
            if tag not in _VOID_TAGS:
                self._skip_tag, self._skip_depth = tag, 1
            return
        if tag == "pre":
            self._pre += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n" if tag not in {"br", "li", "dt", "dd", "tr"} else "\n")

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip_tag is not None:
            return
        if self._pre:
            # Code blocks keep their line structure; mark with a sentinel so collapsing spares them.
            self.parts.append(data.replace("\n", "\x00"))
        else:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Return the readable text of an HTML page, paragraphs separated by blank lines."""
    parser = _Extractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    lines = [line.strip() if "\x00" not in line else line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).replace("\x00", "\n")
    text = text.replace("\u00b6", "")  # Sphinx permalink pilcrows
    return re.sub(r"\n{3,}", "\n\n", text).strip()
