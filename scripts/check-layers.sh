#!/usr/bin/env bash
# check-layers.sh - fail when a source file uses a layer to its left, or when modules form an
# import circle.
#
# Usage: scripts/check-layers.sh [SRC_DIR]     (default: the repository's src/)
#
# The layers, each allowed to use only itself and the layers to its right (ARCHITECTURE.md):
#   main.rs, cli.rs  ->  ops/  ->  tree/  ->  store/  ->  fs/  ->  core/
# Every `use crate::...` (groups included) and every inline `crate::...` path is read; the
# first segment names the layer, the second the module. A module is a file (or a folder's
# mod.rs). Comments and string literals are skipped. Exits 1 and names each offending
# use (file:line) or circle; exits 0 and prints a one-line summary otherwise.
set -euo pipefail
src=${1:-"$(cd "$(dirname "$0")/.." && pwd)/src"}
exec python3 - "$src" <<'PY'
import os, re, sys

src = sys.argv[1]
RANK = {"core": 0, "fs": 1, "store": 2, "tree": 3, "ops": 4, "cli": 5}
TOP = {"main.rs": "cli", "cli.rs": "cli"}


def strip(text):
    """Blank out comments, string and char literals, keeping line numbers."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append("\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]) or (c == "'" and text.startswith("'\\", i)):
            m = re.match(r"'(\\[^']*|[^\\'])'", text[i:])
            if m:
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def paths_after(text, k):
    """The paths (lists of segments) of the use tree that starts at text[k:]."""
    ident = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*|\*)\s*")
    def tree(k):
        k = skip(k)
        if k < len(text) and text[k] == "{":
            k += 1
            res = []
            while True:
                k = skip(k)
                if k >= len(text) or text[k] == "}":
                    return res, k + 1
                sub, k = tree(k)
                res += sub
                k = skip(k)
                if k < len(text) and text[k] == ",":
                    k += 1
        m = ident.match(text, k)
        if not m:
            return [[]], k
        seg, k = m.group(1), m.end()
        if text.startswith("::", k):
            subs, k = tree(k + 2)
            return [[seg] + s for s in subs], k
        return [[seg]], k
    def skip(k):
        while k < len(text) and text[k].isspace():
            k += 1
        return k
    return tree(k)[0]


def module_of(rel):
    parts = rel.split("/")
    if len(parts) == 1:
        return (TOP.get(parts[0]), parts[0][:-3])
    name = parts[1][:-3] if parts[1].endswith(".rs") else parts[1]
    return (parts[0], name)


problems, edges, files = [], {}, 0
for dirpath, _, names in os.walk(src):
    for name in sorted(names):
        if not name.endswith(".rs"):
            continue
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, src)
        layer, mod = module_of(rel)
        if rel == "lib.rs":
            continue
        files += 1
        if layer not in RANK:
            problems.append(f"{rel}: not in any layer (folders: {', '.join(RANK)})")
            continue
        text = strip(open(path, encoding="utf-8").read())
        for m in re.finditer(r"(?<![A-Za-z0-9_:])crate::", text):
            line = text.count("\n", 0, m.start()) + 1
            for p in paths_after(text, m.end()):
                if not p:
                    continue
                to_layer = p[0]
                if to_layer not in RANK:
                    problems.append(f"{rel}:{line}: `crate::{'::'.join(p)}` names no layer")
                    continue
                if RANK[to_layer] > RANK[layer]:
                    problems.append(
                        f"{rel}:{line}: `crate::{'::'.join(p)}`: layer {layer} uses {to_layer}, a layer to its left")
                if len(p) > 1 and p[1] not in ("*", "self"):
                    a, b = f"{layer}/{mod}", f"{to_layer}/{p[1]}"
                    if a != b and not (mod == "mod" and to_layer == layer):
                        edges.setdefault(a, {}).setdefault(b, f"{rel}:{line}")

# Import circles between modules (Tarjan's strongly connected components).
index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = counter[0]; counter[0] += 1
    stack.append(v); on.add(v)
    for w in edges.get(v, {}):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            comps.append(sorted(comp))
for v in list(edges):
    if v not in index:
        visit(v)
for comp in comps:
    where = [f"{a} -> {b} ({edges[a][b]})" for a in comp for b in edges.get(a, {}) if b in comp]
    problems.append(f"import circle among {', '.join(comp)}: " + "; ".join(where))

for p in problems:
    print(f"check-layers: {p}")
if problems:
    print(f"check-layers: FAILED, {len(problems)} problem(s)")
    sys.exit(1)
print(f"check-layers: ok, {files} files, {sum(len(v) for v in edges.values())} module uses, no upward use, no circle")
PY
