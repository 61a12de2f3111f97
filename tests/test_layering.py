"""The house's layout, read from the code: no import cycle, no import against the declared order of the
packages, no import of another package's private modules, and no top-level folder above ~20% of the code.

The order (a package may import only packages on lower floors, and nothing on its own floor but itself):

    floor 0  hooks, losses, synthetic     registries, pure functions, built-in tasks; import no project package
    floor 1  data                         records -> token batches (its `builtin` source is `synthetic`)
    floor 1  peft                         adapters (parameter transforms)
    floor 2  models                       the decoder; its matmuls call peft.dot
    floor 3  diagnostics, merging         HT-SR spectra, entanglement; model merging
    floor 4  optim                        optax transformations, their registry, host hooks of the optimizers
    floor 5  train_lib                    the trainer and the tasks of main.py
    floor 6  configs                      experiment files
    floor 7  main, benchmarks             entry points
"""
import ast
import collections
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOORS = [("hooks", "losses", "synthetic"), ("data", "peft"), ("models",), ("diagnostics", "merging"),
          ("optim",), ("train_lib",), ("configs",), ("main", "benchmarks")]
FLOOR = {pkg: i for i, names in enumerate(FLOORS) for pkg in names}


def _modules():
  """{module name: path} of every project module outside tests/."""
  out = {}
  for path in ROOT.rglob("*.py"):
    rel = path.relative_to(ROOT)
    if rel.parts[0].startswith(".") or rel.parts[0] in ("tests", "workdirs") or rel.parts[0] not in FLOOR:
      continue
    name = ".".join(rel.with_suffix("").parts)
    out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def _imports(name: str, path: pathlib.Path, modules) -> set:
  """Project modules `name` imports anywhere in its file (lazy imports inside functions included)."""
  tree = ast.parse(path.read_text(), str(path))
  is_pkg = path.name == "__init__.py"
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in modules:
        t = t.rpartition(".")[0]
      if t and t != name:
        found.add(t)
  return found


def _graph():
  modules = _modules()
  return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_the_package_floors_are_respected():
  wrong = []
  for mod, deps in _graph().items():
    pkg = mod.split(".")[0]
    for dep in deps:
      other = dep.split(".")[0]
      if other != pkg and FLOOR[other] >= FLOOR[pkg]:
        wrong.append(f"{mod} -> {dep} (floor {FLOOR[pkg]} imports floor {FLOOR[other]})")
  assert not wrong, "imports against the declared order:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
  graph = _graph()
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_package_imports_another_packages_private_modules():
  wrong = []
  for mod, deps in _graph().items():
    for dep in deps:
      parts = dep.split(".")
      if parts[0] != mod.split(".")[0] and any(p.startswith("_") for p in parts[1:]):
        wrong.append(f"{mod} -> {dep}")
  assert not wrong, "private modules imported from outside their package:\n" + "\n".join(sorted(wrong))


def test_no_top_level_folder_holds_much_more_than_a_fifth_of_the_code():
  lines = collections.Counter()
  for mod, path in _modules().items():
    lines[mod.split(".")[0]] += sum(1 for _ in open(path))
  total = sum(lines.values())
  biggest, n = lines.most_common(1)[0]
  assert n / total <= 0.22, f"{biggest} holds {n / total:.0%} of {total} lines: {dict(lines)}"


@pytest.mark.parametrize("pkg", ["peft", "optim", "losses", "hooks"])
def test_each_registry_is_exported(pkg):
  module = __import__(pkg)
  want = {"peft": "register_adapter", "optim": "register_optimizer", "losses": "register",
          "hooks": "register_hook"}[pkg]
  assert callable(getattr(module, want))


def test_the_trainer_names_no_method():
  """train_lib/ is generic: method and loss names appear only in comments and docstrings."""
  names = ("dpo_kernels", "hmk", "galore", "owlore", "tempbalance", "lisa", "fira", "frugal", "lora_pro",
           "lift", "hft", "wpo", "bco")
  hits = []
  for path in sorted((ROOT / "train_lib").glob("*.py")):
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
      if isinstance(node, ast.Name):
        text = node.id
      elif isinstance(node, ast.Attribute):
        text = node.attr
      elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
        text = node.value
      else:
        continue
      for n in names:
        if n in text.lower():
          hits.append(f"{path.name}:{node.lineno}: {text!r}")
  assert not hits, "method names in trainer code:\n" + "\n".join(hits)


if __name__ == "__main__":
  for m, d in sorted(_graph().items()):
    print(m, "->", ", ".join(sorted(d)))
  print({k: v for k, v in collections.Counter(os.path.relpath(p, ROOT).split(os.sep)[0] for p in _modules().values()).items()})
