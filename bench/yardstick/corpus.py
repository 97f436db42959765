"""Build the yardstick corpus from Debian documentation packages.

Downloads each package with ``apt-get download`` (never installs it), unpacks it with
``dpkg-deb -x`` into a cache outside git, turns HTML and man pages into plain text,
splits it into documents, and writes ``train.jsonl``, ``heldout.jsonl`` and
``sources.json`` (package, version, licenses) into the output directory.

    python -m bench.yardstick.corpus            # -> bench/yardstick/data/corpus/
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.yardstick.common import CACHE_DIR, CORPUS_DIR, is_heldout, write_jsonl
from bench.yardstick.html_text import html_to_text
from bench.yardstick.roff_text import roff_to_text

# (package, language, kind). Debian Reference is translated prose; man pages are terse
# technical text; the Python docs give a large block of English.
PACKAGES: list[tuple[str, str, str]] = [
    ("python3.11-doc", "en", "html"),
    ("debian-reference-en", "en", "html"),
    ("debian-reference-de", "de", "html"),
    ("debian-reference-fr", "fr", "html"),
    ("debian-reference-es", "es", "html"),
    ("debian-reference-it", "it", "html"),
    ("debian-reference-pt", "pt", "html"),
    ("debian-reference-ja", "ja", "html"),
    ("debian-reference-zh-cn", "zh", "html"),
    ("manpages-de", "de", "man"),
    ("manpages-fr", "fr", "man"),
    ("manpages-es", "es", "man"),
    ("manpages-it", "it", "man"),
    ("manpages-nl", "nl", "man"),
    ("manpages-pl", "pl", "man"),
    ("manpages-ru", "ru", "man"),
    ("manpages-ja", "ja", "man"),
    # One book in ~25 translations; "*" takes each page's language from its html/<ll-CC>/ folder.
    ("debian-handbook", "*", "html"),
]

# Documents longer than this are cut at paragraph boundaries, so that the hash split
# also holds out parts of the few very long Debian Reference chapters.
CHUNK_CHARS = 6000
MIN_DOC_CHARS = 200


def download(pkg: str, debs: Path) -> Path:
    """Fetch the .deb for ``pkg`` into ``debs`` (cached) and return its path."""
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if found:
        return found[-1]
    subprocess.run(
        ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg],
        cwd=debs,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {pkg} produced no .deb")
    return found[-1]


def deb_field(deb: Path, field: str) -> str:
    """Read one control field of a .deb."""
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True
    ).stdout.strip()


def extract(deb: Path, root: Path) -> Path:
    """Unpack ``deb`` under ``root`` once; return the unpack directory."""
    dest = root / deb.stem
    if not (dest / ".done").exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        (dest / ".done").touch()
    return dest


# (pattern in a free-form copyright file, license name) for packages without DEP-5 fields.
_FREEFORM_LICENSES = [
    (r"PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2", "PSF-2.0"),
    (r"under the same license as the original man\s+pages", "per-page licenses of the original man pages (DFSG-free)"),
]


def licenses(tree: Path, pkg: str) -> tuple[list[str], str]:
    """Licenses named in the package's copyright file, and that file's path in the package."""
    rel = f"usr/share/doc/{pkg}/copyright"
    path = tree / rel
    if not path.exists():  # some doc packages symlink their doc dir to a sibling package
        hits = sorted(tree.glob("usr/share/doc/*/copyright"))
        if not hits:
            return ["unknown (no copyright file in package)"], ""
        path, rel = hits[0], str(hits[0].relative_to(tree))
    text = path.read_text(encoding="utf-8", errors="replace")
    # DEP-5 files name licenses in "License:" fields; long values are license prose, not names.
    fields = re.findall(r"^License:[ \t]*(\S.*)$", text, re.MULTILINE)
    names = list(dict.fromkeys(f.strip() for f in fields if len(f.split()) <= 5))
    if not names:  # free-form copyright files: recognise the licenses they spell out
        names = [name for pattern, name in _FREEFORM_LICENSES if re.search(pattern, text, re.IGNORECASE)]
    names = names or ["see copyright file"]
    return names, "/" + rel


def documents(tree: Path, kind: str) -> list[tuple[str, str]]:
    """(relative path, text) for every text document in an unpacked package."""
    out = []
    if kind == "html":
        files = sorted(p for p in tree.rglob("*.html") if p.is_file() and not p.is_symlink())
        for p in files:
            if "/_sources/" in str(p) or p.name in {
                "genindex.html",
                "search.html",
                "py-modindex.html",
            }:
                continue  # indexes are lists of names, not prose
            out.append(
                (
                    str(p.relative_to(tree)),
                    html_to_text(p.read_text(encoding="utf-8", errors="replace")),
                )
            )
    else:
        files = sorted(p for p in (tree / "usr/share/man").rglob("*.gz") if p.is_file() and not p.is_symlink())
        for p in files:
            src = gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")
            if src.lstrip().startswith(".so "):
                continue  # alias pages only point at another page
            out.append((str(p.relative_to(tree)), roff_to_text(src)))
    return out


def page_language(rel: str, default: str) -> str:
    """Language of one page: the package's, or for "*" packages the html/<ll-CC>/ folder's."""
    if default != "*":
        return default
    m = re.search(r"/html/([a-z]{2,3})(?:-[A-Za-z]{2,4})?/", rel)
    return m.group(1) if m else "und"


def chunks(text: str) -> list[str]:
    """Cut ``text`` into pieces of about CHUNK_CHARS at paragraph boundaries."""
    pieces, cur, size = [], [], 0
    for para in text.split("\n\n"):
        if size and size + len(para) > CHUNK_CHARS:
            pieces.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        pieces.append("\n\n".join(cur))
    return pieces


def main() -> None:
    """Download, extract, convert and split all packages."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=CORPUS_DIR)
    ap.add_argument("--cache", type=Path, default=CACHE_DIR)
    ap.add_argument("--update", action="store_true", help="run apt-get update first")
    args = ap.parse_args()
    debs, trees = args.cache / "debs", args.cache / "trees"
    debs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.update:
        subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)

    train, heldout, sources = [], [], []
    chars: Counter[str] = Counter()
    for i, (pkg, lang, kind) in enumerate(PACKAGES, 1):
        print(f"[{i}/{len(PACKAGES)}] {pkg}: download", end="", flush=True)
        deb = download(pkg, debs)
        tree = extract(deb, trees)
        print(", convert", end="", flush=True)
        docs = documents(tree, kind)
        n_docs = n_chars = 0
        for rel, text in docs:
            # Replacement characters mean a page was not UTF-8; such pages are noise.
            if text.count("\ufffd") > 5:
                continue
            for k, piece in enumerate(chunks(text)):
                if len(piece) < MIN_DOC_CHARS:
                    continue
                doc_id = f"{pkg}:{rel}#{k}"
                row = {"id": doc_id, "lang": page_language(rel, lang), "source": pkg, "text": piece}
                (heldout if is_heldout(doc_id) else train).append(row)
                n_docs += 1
                n_chars += len(piece)
                chars[row["lang"]] += len(piece)
        names, copyright_path = licenses(tree, pkg)
        sources.append(
            {
                "package": pkg,
                "version": deb_field(deb, "Version"),
                "deb": deb.name,
                "language": lang,
                "kind": kind,
                "licenses": names,
                "copyright_file": copyright_path,
                "documents": n_docs,
                "characters": n_chars,
            }
        )
        print(f": {n_docs} docs, {n_chars / 1e6:.2f} M chars", flush=True)

    n_train = write_jsonl(args.out / "train.jsonl", train)
    n_held = write_jsonl(args.out / "heldout.jsonl", heldout)
    summary = {
        "train_documents": n_train,
        "heldout_documents": n_held,
        "characters_by_language": dict(sorted(chars.items())),
        "sources": sources,
    }
    (args.out / "sources.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(
        f"wrote {n_train} train / {n_held} held-out documents to {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
