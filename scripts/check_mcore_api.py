"""Static check: every megatron.core module and name that the given source trees import (and every attribute they
read off an imported megatron.core module) exists in a megatron-core tree, e.g. an unpacked wheel of another
release. Used by scripts/check_gpu_pins.sh for the GPU pin, which cannot be installed on the CPU machine (Python
3.11). Names only: signatures and behaviour are the run-time check's (scripts/gpu_check.sh).

    python scripts/check_mcore_api.py UNPACKED_WHEEL_DIR megatron_bppo tools tests/workers
Prints each missing reference and a count; exits 1 when any is missing.
"""
import ast
import os
import sys


def module_file(root, module):
    base = os.path.join(root, *module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.exists(candidate):
            return candidate
    return None


_NAMES = {}


def defined_names(root, module):
    """(file, names a module defines or imports at any level; a package adds its submodules)."""
    if module in _NAMES:
        return _NAMES[module]
    path, names = module_file(root, module), set()
    if path:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
        if path.endswith("__init__.py"):
            names.update(f[:-3] if f.endswith(".py") else f for f in os.listdir(os.path.dirname(path)))
    _NAMES[module] = (path, names)
    return _NAMES[module]


def check_file(root, path):
    missing, checked, aliases = [], 0, {}
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (SyntaxError, UnicodeDecodeError):
        return missing, checked
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron.core"):
            found, names = defined_names(root, node.module)
            for alias in node.names:
                checked += 1
                sub = f"{node.module}.{alias.name}"
                if found is None:
                    missing.append(f"{path}:{node.lineno}: module {node.module}")
                    break
                if module_file(root, sub):
                    aliases[alias.asname or alias.name] = sub
                elif alias.name != "*" and alias.name not in names:
                    missing.append(f"{path}:{node.lineno}: {sub}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("megatron.core"):
                    checked += 1
                    if module_file(root, alias.name) is None:
                        missing.append(f"{path}:{node.lineno}: module {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            checked += 1
            if node.attr not in defined_names(root, module)[1] and module_file(root, f"{module}.{node.attr}") is None:
                missing.append(f"{path}:{node.lineno}: {module}.{node.attr}")
    return missing, checked


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    root, trees = argv[0], argv[1:]
    missing, checked = [], 0
    for tree in trees:
        for folder, _, files in os.walk(tree):
            for name in sorted(files):
                if name.endswith(".py"):
                    m, c = check_file(root, os.path.join(folder, name))
                    missing += m
                    checked += c
    for line in sorted(set(missing)):
        print("missing:", line)
    print(f"megatron.core references checked: {checked}, missing: {len(set(missing))}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
