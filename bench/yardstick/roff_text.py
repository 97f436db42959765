"""Plain text from man-page roff source, without calling groff (so output is tool-version independent)."""

from __future__ import annotations

import re

_NAMED = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d",
    "oq": "\u2018", "cq": "\u2019", "co": "\u00a9", "rg": "\u00ae", "bu": "\u2022", "tm": "\u2122",
    "mi": "-", "pl": "+", "mu": "\u00d7", "di": "\u00f7", "<=": "\u2264", ">=": "\u2265",
    "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ss": "\u00df", "de": "\u00b0",
    "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039", "fc": "\u203a", "->": "\u2192", "<-": "\u2190",
    "a:": "\u00e4", "o:": "\u00f6", "u:": "\u00fc", "A:": "\u00c4", "O:": "\u00d6", "U:": "\u00dc",
    "e'": "\u00e9", "e`": "\u00e8", "a`": "\u00e0", "c,": "\u00e7", "n~": "\u00f1",
}  # fmt: skip

# Font macros: .B/.I print their arguments; the alternating ones (.BR, .IR, ...) join them tightly.
_FONT_MACROS = {"B", "I", "SM", "SB"}
_ALT_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}
_HEADING_MACROS = {"SH", "SS", "Sh", "Ss"}
_BREAK_MACROS = {
    "PP",
    "LP",
    "P",
    "sp",
    "br",
    "TP",
    "IP",
    "HP",
    "RS",
    "RE",
    "Pp",
    "Bl",
    "El",
    "It",
}


_BACKSLASH = "\x01"  # stands in for literal backslashes while other escapes are resolved


def _unescape(s: str) -> str:
    """Resolve the roff escapes that matter for readable text; drop the rest."""
    # Literal backslashes first, so "\\d" is not mistaken for the "\d" motion escape.
    s = s.replace("\\\\", _BACKSLASH).replace("\\e", _BACKSLASH)
    s = re.sub(r'\\".*$', "", s)  # inline comment
    s = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", s)  # font changes
    s = re.sub(r"\\s[+-]?\d", "", s)  # size changes
    s = re.sub(r"\\\*(\[[^\]]*\]|\(..|.)", "", s)  # string interpolation
    s = re.sub(r"\\\((..)", lambda m: _NAMED.get(m.group(1), ""), s)
    s = re.sub(r"\\\[([^\]]*)\]", lambda m: _NAMED.get(m.group(1), ""), s)
    s = re.sub(r"\\[nkmM](\[[^\]]*\]|\(..|.)", "", s)  # registers, marks, colours
    s = re.sub(r"\\[hvwlLoDZ]'[^']*'", "", s)  # motions, widths, lines, overstrikes
    s = re.sub(r"\\\$.", "", s)  # macro arguments
    s = s.replace("\\-", "-").replace("\\ ", " ").replace("\\~", " ").replace("\\0", " ")
    s = re.sub(r"\\[&%|^c:),/ud]", "", s)  # zero-width marks, italic corrections, half-line moves
    return s.replace(_BACKSLASH, "\\")


def _split_args(rest: str) -> list[str]:
    """Split macro arguments, honouring double quotes."""
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def roff_to_text(src: str) -> str:
    """Return readable text from man(7) roff source; paragraphs separated by blank lines."""
    paras: list[str] = []
    cur: list[str] = []
    fill = True

    def flush() -> None:
        if cur:
            paras.append((" " if fill else "\n").join(cur).strip())
            cur.clear()

    skipping = False
    for raw in src.splitlines():
        line = raw.rstrip()
        # Macro definitions (.de/.am) and ignored blocks (.ig) run to a ".." line: not text.
        if skipping:
            skipping = re.fullmatch(r"\.\s*\.", line.strip()) is None  # ".." or ".  ."
            continue
        if re.match(r"[.']\s*(de|de1|am|ig)\b", line):
            skipping = True
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.']\s*(\S+)\s*(.*)", line)
            if not m:
                continue
            name, rest = m.group(1), m.group(2)
            if name in _HEADING_MACROS:
                flush()
                paras.append(_unescape(" ".join(_split_args(rest))).strip())
            elif name in _FONT_MACROS and rest:
                cur.append(_unescape(" ".join(_split_args(rest))))
            elif name in _ALT_MACROS:
                cur.append(_unescape("".join(_split_args(rest))))
            elif name in _BREAK_MACROS:
                flush()
            elif name == "nf":
                flush()
                fill = False
            elif name == "fi":
                flush()
                fill = True
            continue  # every other request is layout or definitions: no text
        text = _unescape(line)
        if text.strip():
            cur.append(text.strip() if fill else text)
        elif fill:
            flush()
    flush()
    out = "\n\n".join(p for p in paras if p)
    return re.sub(r"[ \t]+", " ", out).strip()
