"""The README is a front page with a map: small, every section in its contents, every link (to a
section of it or of a file in docs/) leading somewhere that exists."""
import os
import re

from conftest import ROOT

DOCS = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text):
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {slug(h) for h in re.findall(r"(?m)^#{1,6} (.+)$", text)}


def test_the_front_page_is_small_and_every_section_is_in_its_contents():
    readme = read(DOCS[0])
    assert len(readme.encode()) <= 20 * 1024, f"README.md is {len(readme.encode())} bytes; move reference text to docs/"
    contents = readme[readme.index("\n## Contents\n"):]
    contents = contents[:contents.index("\n## ", 1)]
    linked = set(re.findall(r"\]\(#([^)]+)\)", contents))
    sections = {slug(h) for h in re.findall(r"(?m)^## (.+)$", readme)} - {"contents"}
    assert sections <= linked, f"sections missing from the contents: {sections - linked}"


def test_every_relative_link_in_the_docs_leads_to_a_file_and_heading_that_exist():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", read(path)):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            where = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(where):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target} (no such file)")
            elif anchor and (os.path.isdir(where) or anchor not in anchors(read(where))):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_file_is_linked_from_the_front_page():
    readme = read(DOCS[0])
    missing = [os.path.basename(p) for p in DOCS[1:] if f"(docs/{os.path.basename(p)}" not in readme]
    assert not missing, f"docs not reachable from README.md: {missing}"
