#!/usr/bin/env python3
"""Checks that every link in the project's Markdown resolves: a relative link names a file or
folder that exists, and a `#anchor` (on this page or another) names one of that page's headings,
spelled as GitHub spells heading anchors. Web links are not fetched. Prints each broken link
with its file and line; exits 1 if there is any.
"""

import os
import re
import subprocess
import sys

LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files(root):
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
                            cwd=root, capture_output=True, text=True, check=True).stdout.split()
    return sorted(path for path in listed if os.path.exists(os.path.join(root, path)))


def prose(text):
    """(line number, line) outside fenced code blocks, with inline code removed."""
    fence = False
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            yield number, re.sub(r"`[^`]*`", "``", line)


def anchors(path):
    """The anchors GitHub gives the headings of `path`."""
    seen = {}
    found = set()
    fence = False
    for line in open(path, encoding="utf-8").read().split("\n"):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        match = None if fence else re.match(r"^#{1,6} (.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def main():
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    broken = []
    cache = {}
    files = markdown_files(root)
    for page in files:
        here = os.path.dirname(os.path.join(root, page))
        for number, line in prose(open(os.path.join(root, page), encoding="utf-8").read()):
            for match in LINK.finditer(line):
                target = match.group(2) or match.group(3)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue
                path, _, anchor = target.partition("#")
                full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(root, page)
                if not os.path.exists(full):
                    broken.append(f"{page}:{number}: {target}: no such file")
                    continue
                if anchor and full.endswith(".md"):
                    if full not in cache:
                        cache[full] = anchors(full)
                    if anchor not in cache[full]:
                        broken.append(f"{page}:{number}: {target}: no heading with that anchor")
    for line in broken:
        print(line)
    if broken:
        print(f"{len(broken)} broken link(s)")
        return 1
    print(f"docs: every link in {len(files)} Markdown files resolves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
