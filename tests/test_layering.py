"""The package's walls, checked on its source: no import circle, Orbax only in checkpoint.py, no import of the
top-level configs/ (a pip-installed package has none), no `config.get(key, default)` fallback."""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'ovseg_jax')


def _modules() -> dict[str, ast.Module]:
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.').removesuffix('.__init__')
        with open(path) as fh:
          out[name] = ast.parse(fh.read())
  return out


def _imports(tree: ast.Module) -> set[str]:
  """Every module name imported anywhere in the file (also inside functions)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  return names


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while not comp or comp[-1] != v:
        comp.append(stack.pop())
        on_stack.discard(comp[-1])
      if len(comp) > 1:
        out.append(sorted(comp))
  for v in graph:
    if v not in index:
      visit(v)
  return out


def test_no_import_circle():
  modules = _modules()
  graph = {m: {n for n in _imports(t) if n in modules and n != m} for m, t in modules.items()}
  assert _circles(graph) == []
  # The check finds a circle when there is one.
  graph['ovseg_jax.fileio'].add('ovseg_jax.checkpoint')
  assert _circles(graph) == [['ovseg_jax.checkpoint', 'ovseg_jax.fileio']]


def test_only_checkpoint_py_imports_orbax():
  users = sorted(m for m, t in _modules().items() if any(n.split('.')[0] == 'orbax' for n in _imports(t)))
  assert users == ['ovseg_jax.checkpoint']


def test_the_package_never_imports_configs():
  users = sorted(m for m, t in _modules().items() if any(n.split('.')[0] == 'configs' for n in _imports(t)))
  assert users == []


def test_no_config_get_fallbacks():
  """`config.model.vision.get('stem_channels', ())` hides a missing default; every key is in configs/."""
  receiver = re.compile(r'(^|\.)(config|cfg|model_config)$|\.(vision|binding|text|proj|decoder|loss|data|train|'
                        r'eval|optim|model)$')
  found = []
  for name, tree in _modules().items():
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'get'
          and receiver.search(ast.unparse(node.func.value))):
        found.append(f'{name}:{node.lineno}: {ast.unparse(node)}')
  assert found == []


def test_inference_defaults_without_the_configs_folder(tmp_path):
  """Only the package on the path (as after pip install): the eval defaults still resolve."""
  os.symlink(PACKAGE, tmp_path / 'ovseg_jax')
  code = ('import sys; sys.path[:] = [p for p in sys.path if p not in ("", %r)]; '
          'from ovseg_jax import inference; print(inference.default_eval_config(top_k=3).to_dict())' % ROOT)
  proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=str(tmp_path)))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "'top_k': 3" in proc.stdout and "'short_side': 448" in proc.stdout
