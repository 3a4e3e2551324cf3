"""The package's shape: no import cycles (function-local imports included), one mesh
factory, and the trainer's flags defined only when it is the program."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, 'jaxlm')


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(PKG):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = \
            os.path.join(dirpath, f)
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the jaxlm modules it imports anywhere in its body, function-local imports
  included (`from P import m` with m a submodule counts as importing P.m)."""
  modules = _modules()
  graph = {m: set() for m in modules}
  for name, path in modules.items():
    is_pkg = path.endswith('__init__.py')
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          parts = name.split('.')
          parts = parts[:len(parts) - node.level + (1 if is_pkg else 0)]
          base = '.'.join(parts + ([base] if base else []))
        # `from P import m`: the submodule P.m when m is one, else (an attribute) P itself
        targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base
                   for a in node.names]
      for t in targets:
        while t and t not in modules:   # an attribute of a module: the module itself
          t = t.rpartition('.')[0]
        if t and t != name:
          graph[name].add(t)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_sees_function_local_imports(tmp_path):
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
  assert cycles(graph) == [['a', 'b', 'c']]
  assert cycles({'a': {'b'}, 'b': set()}) == []
  g = import_graph()
  assert 'jaxlm.aot' in g['jaxlm.train']           # a function-local import, found
  assert 'jaxlm.config' in g['jaxlm.checkpoint']


def test_no_module_imports_one_that_imports_it_back():
  assert cycles(import_graph()) == []


def test_leaf_and_library_modules_do_not_import_the_trainer():
  g = import_graph()
  for m in ('jaxlm.aot', 'jaxlm.config', 'jaxlm.checkpoint', 'jaxlm.sharding',
            'jaxlm.evaluate.__main__', 'jaxlm.sweep', 'jaxlm.bench.data'):
    assert 'jaxlm.train' not in g[m], m
  assert not {m for m in g['jaxlm.aot'] if m in ('jaxlm.config', 'jaxlm.checkpoint')}


def test_importing_the_trainer_defines_no_flags():
  code = ('from absl import flags; import jaxlm.train, jaxlm.evaluate.__main__; '
          'print(sorted(n for n in ("config", "workdir", "aot_only", "topology") '
          'if n in flags.FLAGS))')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  assert out.returncode == 0, out.stderr
  assert 'workdir' not in out.stdout and 'aot_only' not in out.stdout, out.stdout


def test_the_trainers_mesh_spans_two_slices_with_the_data_axis():
  import jax
  from jaxlm import config as config_lib
  import train_config
  c = train_config.get_config()
  c.mesh.devices, c.mesh.fsdp = 0, -1
  cfg = config_lib.model_config(c)
  slice_of = lambda d: d.id // 4          # 8 CPU devices as two slices of 4
  mesh, shape = config_lib.run_mesh(c, cfg, jax.devices()[:8], slice_index=slice_of)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1, 'context': 1}
  for i in range(2):   # each data index lies in one slice; fsdp stays within it
    assert {slice_of(d) for d in mesh.devices[i].flat} == {i}
  c.mesh.data = 3
  with pytest.raises(config_lib.ConfigError, match='mesh'):
    config_lib.run_mesh(c, cfg, jax.devices()[:8], slice_index=slice_of)
  c.mesh.data, c.mesh.fsdp = 1, -1        # one slice: the plain mesh
  mesh, _ = config_lib.run_mesh(c, cfg, jax.devices()[:8])
  assert dict(mesh.shape)['data'] == 1


def test_the_core_path_does_not_know_the_demo():
  # The from-scratch demo's machinery lives in jaxlm/demo; the trainer, the tasks and the
  # pipeline a pretrained-model run goes through do not mention it.
  words = ('demo', 'embed_init', 'compose_embeddings', 'extra_quer', 'curriculum', 'turns',
           'prompt_loss', 'tiny_tokenizer')
  for path in ('jaxlm/train.py', 'jaxlm/data/kv.py', 'jaxlm/data/pipeline.py',
               'jaxlm/config.py', 'jaxlm/checkpoint.py', 'configs/base.py'):
    text = open(os.path.join(ROOT, path)).read().lower()
    assert not [w for w in words if re.search(rf'\b{w}', text)], path
  g = import_graph()
  importers = {m for m, deps in g.items() for d in deps if d.startswith('jaxlm.demo')}
  assert importers <= {'jaxlm.data.tasks', 'jaxlm.embed_init', 'jaxlm.data.tiny_tokenizer',
                       'jaxlm.bench.recall'} | {m for m in g if m.startswith('jaxlm.demo')}


def test_only_tpu_devices_form_slices():
  # GPU hosts report a slice_index too (one per host or NVLink domain): their mesh stays flat.
  import types
  from jaxlm import sharding as shd
  tpu = types.SimpleNamespace(platform='tpu', slice_index=3)
  gpu = types.SimpleNamespace(platform='gpu', slice_index=3)
  assert (shd.tpu_slice_index(tpu), shd.tpu_slice_index(gpu)) == (3, 0)
