#!/usr/bin/env python3
"""Import cycles between this crate's modules (folders count as modules two
levels deep: src/runs/mod.rs and src/runs/x.rs are `runs` and `runs::x`).

Reads every `crate::…` path named in src/ (unit-test modules at the end of a
file left out), and prints each group of modules that reach each other.
Exit status 1 when there is a cycle. Usage: python3 .ci/cycles.py [SRC]"""
import pathlib
import re
import sys

src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "src")
modules = {}
for path in sorted(src.rglob("*.rs")):
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts in ([], ["main"], ["lib"]):
        continue
    modules[path] = "::".join(parts[:2])
known = set(modules.values())


def names(text):
    """Every crate path in `text`, `use crate::{a, b::{c}}` trees expanded."""
    text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
    found = re.findall(r"crate::((?:[a-z_][a-z0-9_]*)(?:::[a-z_][a-z0-9_]*)*)", text)
    for tree in re.finditer(r"crate::((?:[a-z_][a-z0-9_]*::)*)\{([^;]*)\}", text):
        prefix = tree.group(1)
        for item in re.findall(r"[a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*", tree.group(2)):
            found.append(prefix + item)
    return found


def owner(path):
    parts = path.split("::")
    for n in (2, 1):
        if "::".join(parts[:n]) in known:
            return "::".join(parts[:n])
    return None


edges = {m: set() for m in known}
for path, mod in modules.items():
    for name in names(path.read_text()):
        target = owner(name)
        # a folder's mod.rs declaring its own children is not a dependency
        if target and target != mod and not target.startswith(mod + "::"):
            edges[mod].add(target)

# Tarjan's strongly connected components.
index, low, stack, on_stack, groups = {}, {}, [], set(), []


def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
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
            groups.append(sorted(group))


for v in sorted(known):
    if v not in index:
        visit(v)
for g in groups:
    print("cycle: " + " <-> ".join(g))
print(f"{len(known)} modules, {sum(map(len, edges.values()))} edges, {len(groups)} cycles")
sys.exit(1 if groups else 0)
