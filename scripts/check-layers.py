#!/usr/bin/env python3
"""Checks the layering ARCHITECTURE.md states: no two top-level modules of a crate import each
other (directly or round a circle), and the loader's wings import only downwards:

    storage  <-  dataset  <-  transform  <-  serve
    (error, config and allocator sit beside them; metrics reads serve)

A module's imports are the `crate::`, `super::` and `self::` paths in its source outside
`#[cfg(test)]` blocks. Prints each violation with the files that make it; exits 1 if any.
"""

import os
import re
import sys

# Per crate: (source root, {module: modules it must never import}).
CRATES = {
    "loader-server": ("loader-server/src", {
        "storage": {"dataset", "transform", "serve", "metrics", "config"},
        "dataset": {"transform", "serve", "metrics"},
        "transform": {"serve", "metrics"},
        "error": {"dataset", "storage", "transform", "serve", "metrics", "config"},
    }),
    "trainer-client": ("trainer-client/src", {
        "addr": {"client", "catalog", "dispatch", "plan"},
        "client": {"catalog", "dispatch", "plan"},
    }),
}

USE_GROUP = re.compile(r"\buse\s+(crate|super|self)::\{(.*?)\};", re.S)
PATH = re.compile(r"\b(crate|super|self)::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)")
GROUP_ITEM = re.compile(r"(?:^|[{,]\s*)([a-z_][a-z0-9_]*)")


def modules(root):
    """{module path (a::b): (file, source without tests and comments)}."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            if parts[:1] == ["bin"]:
                continue
            text = open(path, encoding="utf-8").read().split("#[cfg(test)]")[0]
            found["::".join(parts)] = (path, re.sub(r"//.*", "", text))
    return found


def imports(module, text, known):
    """Modules of `known` that `module`'s text names."""
    here = module.split("::") if module else []
    targets = set()

    def add(base, rest):
        start = {"crate": [], "super": here[:-1], "self": here}[base]
        segments = start + rest.split("::")
        for n in range(len(segments), 0, -1):
            candidate = "::".join(segments[:n])
            if candidate in known:
                targets.add(candidate)
                return

    for group in USE_GROUP.finditer(text):
        base, body = group.groups()
        depth = 0
        item = ""
        for ch in body + ",":
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                head = item.strip().split("::")[0].strip("{ ")
                if head and head[0].islower():
                    add(base, head)
                item = ""
            else:
                item += ch
    for path in PATH.finditer(text):
        add(*path.groups())
    return targets


def circles(edges):
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main():
    failures = []
    for crate, (root, forbidden) in CRATES.items():
        found = modules(root)
        known = set(found)
        top = {}
        why = {}
        for module, (path, text) in found.items():
            a = module.split("::")[0]
            for target in imports(module, text, known):
                b = target.split("::")[0]
                if a and b and a != b:
                    top.setdefault(a, set()).add(b)
                    why.setdefault((a, b), set()).add(path)
        for a, never in forbidden.items():
            for b in sorted(top.get(a, set()) & never):
                failures.append(f"{crate}: {a} imports {b} ({', '.join(sorted(why[(a, b)]))})")

        def reach(start):
            seen, todo = set(), [start]
            while todo:
                for nxt in top.get(todo.pop(), ()):
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            return seen

        for a in sorted(top):
            for b in sorted(top[a]):
                if a < b and a in reach(b):
                    failures.append(f"{crate}: {a} and {b} import each other ({', '.join(sorted(why[(a, b)]))} "
                                    f"and back)")
        # Within the wings too: no two modules import each other round a circle (a module may use
        # what its ancestors hold; a parent naming its children is no import).
        edges = {m: {t for t in imports(m, text, known) if t and t != m and not m.startswith(t + "::")}
                 for m, (_, text) in found.items()}
        for circle in circles(edges):
            if len({m.split("::")[0] for m in circle}) == 1:
                failures.append(f"{crate}: modules import each other round a circle: {', '.join(circle)}")
    for failure in failures:
        print(failure)
    if failures:
        print("the layering in ARCHITECTURE.md is broken; move the shared piece down a layer")
        return 1
    print("layers: no import circles between or within modules; the loader's wings import only downwards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
