"""The package's layout (docs/architecture.md): commands on top, the library in subpackages
whose imports run one way, and every command starting as documented."""

import ast
import os
import subprocess
import sys

from conftest import REPO

PACKAGE = os.path.join(REPO, "decoderjax")
COMMANDS = ("train", "prepare", "evaluate", "generate", "serve", "convert", "quantize", "prune",
            "compile", "predict")  # fmt: skip
# Lowest first: a subpackage imports only those before it (data and model need not import
# each other, nor evaluation and training).
LAYERS = ("runtime", "data", "model", "checkpoints", "inference", "evaluation", "training")


def modules() -> dict[str, str]:
  """{dotted module name: path} of every module under decoderjax/."""
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def imports(path: str) -> set[str]:
  """The decoderjax modules a file imports, at its top or inside functions."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("decoderjax"):
      out.update(f"{node.module}.{a.name}" for a in node.names)
      out.add(node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("decoderjax"))
  return out


def test_top_level_holds_only_commands_and_cli():
  top = sorted(n for n in os.listdir(PACKAGE) if n.endswith(".py"))
  assert top == sorted(["__init__.py", "cli.py", *(f"{c}.py" for c in COMMANDS)])
  packages = sorted(
    n for n in os.listdir(PACKAGE) if os.path.isfile(os.path.join(PACKAGE, n, "__init__.py"))
  )
  assert packages == sorted(LAYERS)


def test_subpackages_import_one_way_and_never_a_command():
  known = modules()
  layer = {name: LAYERS.index(name.split(".")[1]) for name in known if name.count(".") >= 2}
  packages = {f"decoderjax.{p}" for p in LAYERS}
  for name, path in known.items():
    if name not in layer:
      continue  # a command, cli or the package itself: may import anything in the library
    for target in imports(path) & set(known) - packages:
      assert target in layer, f"{name} imports {target}, which is not in a subpackage"
      assert layer[target] <= layer[name], f"{name} imports {target}, a higher layer"
      if layer[target] == layer[name] and target.split(".")[1] != name.split(".")[1]:
        raise AssertionError(f"{name} imports {target}: data/model, evaluation/training apart")


def test_no_cycles_between_modules_and_no_shared_stems():
  known = modules()
  graph = {name: imports(path) & set(known) - {name} for name, path in known.items()}
  state = {}

  def visit(node, trail):
    if state.get(node) == "done":
      return
    assert state.get(node) != "open", f"import cycle: {' -> '.join([*trail, node])}"
    state[node] = "open"
    for nxt in graph[node]:
      visit(nxt, [*trail, node])
    state[node] = "done"

  for name in graph:
    visit(name, [])
  library = [n.rsplit(".", 1)[1] for n in known if n.count(".") >= 2 and not n.endswith("__")]
  assert len(library) == len(set(library)), "two library modules share a name"
  for stem in library:  # generate/generator, prepare/preparation, serve/server, ...
    clash = [c for c in COMMANDS if stem.startswith(c[:-1]) or c.startswith(stem)]
    assert not clash, f"library module {stem} reads like the command {clash}"


def test_package_inits_are_empty_and_prepare_loads_no_jax():
  for root, _, files in os.walk(PACKAGE):
    if "__init__.py" in files:
      tree = ast.parse(open(os.path.join(root, "__init__.py")).read())
      assert all(isinstance(n, ast.Expr) for n in tree.body), f"{root}/__init__.py runs code"
  code = "import sys, decoderjax.prepare; print(sorted(m for m in sys.modules if m == 'jax'))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_every_command_answers_help():
  """`python -m decoderjax.NAME --helpshort` for every command, started side by side."""
  runs = {
    c: subprocess.Popen(
      [sys.executable, "-m", f"decoderjax.{c}", "--helpshort"],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )  # fmt: skip
    for c in COMMANDS
  }
  for command, run in runs.items():
    out, err = run.communicate(timeout=300)
    assert run.returncode in (0, 1) and "Traceback" not in err, (command, err[-2000:])
    assert f"decoderjax/{command}.py:" in out + err, command
