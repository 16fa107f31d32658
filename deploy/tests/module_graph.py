#!/usr/bin/env python3
"""The library's top-level modules must not depend on each other in a cycle.

A module's dependencies are the other top-level modules its files name
(`crate::x`, in a `use` or a path), test code (`#[cfg(test)]` modules)
excluded. Prints the graph, and exits 1 naming a cycle when there is one.
Usage: deploy/tests/module_graph.py [--dot]"""

import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")
BIN_ONLY = {"main.rs", "demo.rs"}


def modules():
    names = []
    for f in sorted(os.listdir(SRC)):
        if f.endswith(".rs") and f not in BIN_ONLY and f != "lib.rs":
            names.append(f[:-3])
    return names


def files_of(name):
    out = [os.path.join(SRC, name + ".rs")]
    d = os.path.join(SRC, name)
    for root, _, files in os.walk(d):
        out += [os.path.join(root, f) for f in files if f.endswith(".rs")]
    return out


def without_tests(text):
    """Drop `#[cfg(test)] mod … { … }` blocks (brace-matched)."""
    out, i = [], 0
    pat = re.compile(r"#\[cfg\(test\)\]\s*(#\[[^\]]*\]\s*)*mod\s+\w+\s*\{")
    while True:
        m = pat.search(text, i)
        if not m:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j


def graph():
    names = modules()
    g = {}
    for n in names:
        deps = set()
        for f in files_of(n):
            if not os.path.exists(f):
                continue
            text = without_tests(open(f, encoding="utf-8").read())
            text = re.sub(r"//[^\n]*", "", text)
            for m in re.finditer(r"\bcrate::(\w+)", text):
                if m.group(1) in names and m.group(1) != n:
                    deps.add(m.group(1))
            # `use crate::{a, b::c}` groups
            for m in re.finditer(r"\bcrate::\{([^}]*)\}", text):
                for part in re.findall(r"(?:^|,)\s*(\w+)", m.group(1)):
                    if part in names and part != n:
                        deps.add(part)
        g[n] = sorted(deps)
    return g


def cycle(g):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in g[n]:
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c:
                    return c
        state[n] = 2
        stack.pop()
        return None

    for n in g:
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def main():
    g = graph()
    if "--dot" in sys.argv:
        print("digraph collie {")
        for n, ds in g.items():
            for d in ds:
                print(f"  {n} -> {d};")
        print("}")
        return 0
    for n, ds in g.items():
        print(f"{n:>9} → {', '.join(ds) or '(nothing)'}")
    c = cycle(g)
    if c:
        print("cycle: " + " → ".join(c), file=sys.stderr)
        return 1
    print("no cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
