#!/usr/bin/env python3
"""Checks that no two modules of a workspace crate import each other (ARCHITECTURE.md's
invariant): module A naming `crate::B…` or `super::B…` while B names A. A crate's root (lib.rs,
main.rs), which declares the modules, is left out, and so are `#[cfg(test)]` modules and
comments (doc links are not imports). Prints the pairs it finds and exits 1 if there are any.

    scripts/module-imports.py            every workspace member
    scripts/module-imports.py DIR...     these crates
"""
import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_name(src, path):
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    if rel in (["lib"], ["main"]) or rel[:1] == ["bin"]:
        return None
    return "::".join(rel)


def strip(text):
    """The code without comments and without its #[cfg(test)] modules."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def paths_after(text, prefix):
    """Every path named after `prefix::`, braces expanded (`a::{b, c::d}` gives a::b, a::c::d)."""
    found = []

    def expand(base, s, k):
        # s[k] is just after '{': items up to the matching '}'
        item, depth, start = [], 0, k
        while k < len(s):
            ch = s[k]
            if ch == "{":
                sub = s[start:k].strip().rstrip(":").strip()
                k = expand(base + ([sub] if sub else []), s, k + 1)
                start = k
                continue
            if ch in ",}":
                piece = s[start:k].strip()
                if piece and piece not in ("self", "*"):
                    found.append("::".join(base + [piece.split(" as ")[0].strip()]))
                if ch == "}":
                    return k + 1
                start = k + 1
            k += 1
        return k

    for m in re.finditer(r"\b" + prefix + r"::", text):
        k = m.end()
        if k < len(text) and text[k] == "{":
            expand([], text, k + 1)
        else:
            p = re.match(r"[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*", text[k:])
            if p:
                found.append(p.group(0))
    return found


def crate_edges(crate_dir):
    src = os.path.join(crate_dir, "src")
    modules = {}
    for root, _, files in os.walk(src):
        for f in files:
            if f.endswith(".rs"):
                path = os.path.join(root, f)
                name = module_name(src, path)
                if name:
                    with open(path, encoding="utf-8") as fh:
                        modules[name] = strip(fh.read())
    edges = set()
    for name, text in modules.items():
        parent = name.rsplit("::", 1)[0] if "::" in name else ""
        targets = paths_after(text, "crate")
        targets += [(parent + "::" + t) if parent else t for t in paths_after(text, "super")]
        for t in targets:
            parts = t.split("::")
            # The longest prefix that is a module of this crate.
            for n in range(len(parts), 0, -1):
                cand = "::".join(parts[:n])
                if cand in modules:
                    if cand != name:
                        edges.add((name, cand))
                    break
    return modules, edges


def members():
    with open(os.path.join(ROOT, "Cargo.toml"), "rb") as fh:
        return [os.path.join(ROOT, m) for m in tomllib.load(fh)["workspace"]["members"]]


def main():
    crates = sys.argv[1:] or members()
    bad = 0
    for crate in crates:
        modules, edges = crate_edges(crate)
        pairs = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})
        for a, b in pairs:
            print(f"{os.path.relpath(crate, ROOT)}: {a} and {b} import each other")
        bad += len(pairs)
    if bad:
        sys.exit(1)
    print(f"module imports: no two modules import each other ({len(crates)} crates)")


if __name__ == "__main__":
    main()
