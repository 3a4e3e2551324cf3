"""Will it fit? Ahead-of-time compilation of the real train step, for this machine's
devices or for a TPU topology described by libtpu on a CPU host.

  python -m jaxlm.train --config=configs/mistral7b_simple_kv.py --aot_only
  python -m jaxlm.train --config=configs/mistral7b_simple_kv.py --aot_only --topology=v5p-32
  python -m jaxlm.train ... --aot_only --topology=2xv6e-8      # two slices of v6e-8

Topology names are Cloud TPU accelerator types: v5p-N (N TensorCores, N/2 chips, a 3D
torus), v5e-N / v5litepod-N and v6e-N (N chips, 2D), with an optional `Kx` prefix for K
slices. The TPU path needs libtpu (`pip install -r requirements-tpu.txt`, the version that
matches the pinned jax), but no TPU: jax.experimental.topologies describes the devices and
XLA compiles for them. Nothing is allocated: the model and optimizer are built abstractly
(nnx.eval_shape), so a 7B recipe compiles on a laptop.

The report (printed, and returned as a dict; the trainer writes it to WORKDIR/aot.json):
per-device memory from the compiler (arguments, outputs, temporaries, total) against the
chip's HBM; the compiler's FLOP estimate per device; the model FLOPs per step from
jaxlm.flops; and, from the chip's peak, a step-time lower bound (the larger of the compiled
and the model FLOPs per device, at 100% of peak) and the MFU upper bound that implies
(model FLOPs / that work: remat recompute lowers it). XLA counts a while loop's body once,
not per trip, so with blockwise attention or scanned layers the compiled figure undercounts and the model
FLOPs set the bound. Real steps are slower: communication, memory-bound ops and kernel
efficiency are not in the bound.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

# Per chip: bf16 peak FLOP/s (public Cloud TPU specs); HBM as the TPU compiler counts it
# available (libtpu 0.0.42.1 reports 95.74G, 15.75G and 31.25G in its out-of-memory
# messages: GiB, a little under the physical 96, 16 and 32 GiB); the device_kind libtpu
# reports; TensorCores per device in the accelerator-type number (v5p-8 = 4 chips).
CHIPS = {
    'v5p': dict(peak=459e12, hbm=95.74 * 2**30, kind='TPU v5', cores_per_device=2, dims=3),
    'v5e': dict(peak=197e12, hbm=15.75 * 2**30, kind='TPU v5 lite', cores_per_device=1,
                dims=2),
    'v6e': dict(peak=918e12, hbm=31.25 * 2**30, kind='TPU v6 lite', cores_per_device=1,
                dims=2),
}
ALIASES = {'v5litepod': 'v5e'}
LIBTPU_HINT = ('the TPU topology path needs libtpu: pip install -r requirements-tpu.txt '
               '(the libtpu version that matches the pinned jax)')


class TopologyError(ValueError):
  """An unknown or unsupported topology name, or libtpu missing; the message says which."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str            # as given, e.g. '2xv5p-32'
  generation: str      # v5p | v5e | v6e
  chips: int           # per slice
  slices: int
  shape: tuple[int, ...]

  @property
  def chip(self) -> dict[str, Any]:
    return CHIPS[self.generation]

  @property
  def topology_name(self) -> str:   # libtpu's name: 'v5p:2x4x4'
    return f'{self.generation}:{"x".join(map(str, self.shape))}'

  @property
  def num_devices(self) -> int:
    return self.chips * self.slices


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The standard slice shape for a chip count: v5p 4 -> 2x2x1, 8 -> 2x2x2, 32 -> 2x4x4;
  v5e/v6e 8 -> 2x4, 16 -> 4x4 (power-of-two counts; doubling the last smallest side)."""
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f'{chips} chips: only power-of-two slice sizes are supported')
  if dims == 3 and chips >= 4:
    shape, n = [2, 2, 1], 4
  else:
    shape, n = [1] * dims, 1
  while n < chips:
    i = max(j for j, s in enumerate(shape) if s == min(shape))
    shape[i] *= 2
    n *= 2
  return tuple(shape)


def parse_topology(name: str) -> Topology:
  m = re.fullmatch(r'(?:(\d+)x)?(v\d+[a-z]*|v5litepod)-(\d+)', name.strip())
  if not m:
    raise TopologyError(f'--topology={name!r} is not a TPU type like v5p-32, v5e-16, v6e-8 '
                        f'(optionally Kx for K slices: 2xv5p-32)')
  slices = int(m.group(1) or 1)
  gen = ALIASES.get(m.group(2), m.group(2))
  if gen not in CHIPS:
    raise TopologyError(f'--topology={name!r}: generation {m.group(2)!r} is not supported '
                        f'(supported: {sorted(CHIPS)} and v5litepod)')
  count = int(m.group(3))
  per = CHIPS[gen]['cores_per_device']
  if count % per or count < per:
    raise TopologyError(f'--topology={name!r}: {gen}-N counts TensorCores, N must be a '
                        f'multiple of {per}')
  if slices < 1:
    raise TopologyError(f'--topology={name!r}: the slice count must be at least 1')
  chips = count // per
  return Topology(name, gen, chips, slices, torus_shape(chips, CHIPS[gen]['dims']))


def topology_devices(topo: Topology):
  """The abstract devices of a TPU topology (libtpu needed, no TPU)."""
  try:
    import libtpu  # noqa: F401  (the compiler plug-in jax loads for platform='tpu')
  except ImportError:
    raise TopologyError(LIBTPU_HINT) from None
  from jax.experimental import topologies
  # No TPU is used: let this process load libtpu even when another holds its lockfile
  # (another compile, a test run), and name this host as its only worker.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  kwargs = {}
  if topo.chips < 4:   # v5e-1, v6e-2, ...: single-host slices smaller than a 2x2 host
    kwargs['chips_per_host_bounds'] = (*topo.shape, 1)[:3]
  try:
    desc = topologies.get_topology_desc(platform='tpu', topology_name=topo.topology_name,
                                        num_slices=topo.slices, **kwargs)
  except Exception as e:   # libtpu's errors are RuntimeError / XlaRuntimeError
    raise TopologyError(f'libtpu could not describe {topo.topology_name} x {topo.slices} '
                        f'slice(s): {str(e).splitlines()[0]}') from None
  devices = list(desc.devices)
  if len(devices) != topo.num_devices:
    raise TopologyError(f'{topo.name}: libtpu describes {len(devices)} devices, expected '
                        f'{topo.num_devices}')
  return devices


def abstract_train_state(cfg, c, tx):
  """(graphdef, abstract state) of model + optimizer: shapes and logical axes, no memory."""
  from flax import nnx
  from jaxlm import freeze, lora
  from jaxlm.model import init_model
  lcfg = lora.LoRAConfig.from_config(c)

  def build():
    model = init_model(cfg, seed=c.seed)
    if lcfg.enabled:
      lora.attach(model, lcfg, seed=c.seed)
    return model, nnx.Optimizer(model, tx, wrt=freeze.trainable_filter(c, cfg))
  return nnx.split(nnx.eval_shape(build))


BATCH_KEYS = ('inputs', 'targets', 'loss_mask', 'positions', 'segment_ids')


def step_input_avals(state, shardings, batch_sharding, batch_size: int, seq_len: int):
  """The train step's arguments as shapes for `jit(...).lower`: the state's leaves in their
  shardings, and int32 [batch_size, seq_len] in the batch sharding for each batch field."""
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=batch_sharding)
           for k in BATCH_KEYS}
  return abstract, batch


def compile_report(c, cfg, mesh, make_step, tx, *, topology: Topology | None = None,
                   log=print) -> dict[str, Any]:
  """Lower and compile the train step for `mesh` and report memory, FLOPs and bounds.
  make_step(graphdef) -> the step function the trainer jits; tx: its optax optimizer."""
  from jax.sharding import NamedSharding
  from jaxlm import flops
  from jaxlm import sharding as shd

  graphdef, state = abstract_train_state(cfg, c, tx)
  shardings = shd.state_shardings(state, mesh)
  seq_sharded = mesh.shape['context'] > 1
  batch_sharding = NamedSharding(mesh, shd.batch_spec(seq_sharded))
  step_fn = jax.jit(make_step(graphdef), in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, None), donate_argnums=0)
  abstract, batch = step_input_avals(state, shardings, batch_sharding, c.train.batch_size,
                                     c.data.seq_len)
  with jax.set_mesh(mesh):
    lowered = step_fn.lower(abstract, batch)
    try:
      compiled, error = lowered.compile(), None
    except Exception as e:   # the TPU compiler refuses a program that cannot fit in HBM
      if 'RESOURCE_EXHAUSTED' not in str(e) or topology is None:
        raise
      compiled, error = None, str(e).strip().splitlines()[-1]
  device = mesh.devices.flat[0]
  report: dict[str, Any] = {
      'topology': topology.name if topology else None,
      'mesh': dict(mesh.shape), 'devices': int(mesh.size),
      'device_kind': device.device_kind,
      'params': int(cfg.num_params()), 'seq_len': int(c.data.seq_len),
      'global_batch': int(c.train.batch_size), 'attention': cfg.attention_impl,
      'remat': getattr(cfg, 'remat', None)}
  tokens = c.train.batch_size * c.data.seq_len
  from jaxlm import freeze
  from jaxlm.lora import LoRAConfig
  report['model_flops_per_step'] = float(flops.train_flops_per_token(
      cfg, c.data.seq_len, head_positions=c.train.get('loss_positions'),
      lora=LoRAConfig.from_config(c), trainable_layers=freeze.trainable_layers(c)) * tokens)
  if compiled is None:
    # "... HLO temporaries (214.78G) exceeds available HBM (95.74G)": keep the numbers.
    need = re.search(r'required for [^(]*\(([\d.]+)([KMGT])\)', error)
    scale = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
    report.update(
        fits=False, compile_error=error, argument_bytes=None, output_bytes=None,
        alias_bytes=None, temp_bytes=None, compiler_flops_per_device=None,
        total_bytes_per_device=(float(need.group(1)) * scale[need.group(2)] if need else None),
        hbm_bytes_per_device=topology.chip['hbm'], peak_flops_per_device=topology.chip['peak'],
        step_time_lower_bound_s=None, mfu_upper_bound=None)
    log(format_report(report))
    return report
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  report.update({
      'argument_bytes': int(mem.argument_size_in_bytes),
      'output_bytes': int(mem.output_size_in_bytes),
      'temp_bytes': int(mem.temp_size_in_bytes),
      'alias_bytes': int(mem.alias_size_in_bytes)})
  report['total_bytes_per_device'] = (report['argument_bytes'] + report['output_bytes'] +
                                      report['temp_bytes'] - report['alias_bytes'])
  report['compiler_flops_per_device'] = float(cost.get('flops', 0.0)) or None
  peak = topology.chip['peak'] if topology else flops.device_peak(
      c.train.peak_flops_per_device)
  hbm = topology.chip['hbm'] if topology else None
  report['peak_flops_per_device'] = peak
  report['hbm_bytes_per_device'] = hbm
  report['fits'] = None if hbm is None else report['total_bytes_per_device'] <= hbm
  if peak:
    # XLA's count is a floor: a while loop's body (blockwise attention, scans) is counted
    # once, not per trip. So the bound takes the larger of it and the model's FLOPs.
    work = max(report['compiler_flops_per_device'] or 0.0,
               report['model_flops_per_step'] / mesh.size)
    report['step_time_lower_bound_s'] = work / peak
    report['mfu_upper_bound'] = report['model_flops_per_step'] / (mesh.size * work)
  else:
    report['step_time_lower_bound_s'] = report['mfu_upper_bound'] = None
  log(format_report(report))
  return report


def format_report(r: dict[str, Any]) -> str:
  gib = lambda b: f'{b / 2**30:.2f} GiB' if b >= 2**30 else f'{b / 2**20:.2f} MiB'
  where = f"topology {r['topology']} ({r['devices']} x {r['device_kind']})" if r['topology'] \
      else f"{r['devices']} x {r['device_kind']}"
  head = (f"[aot] {r['params'] / 1e9:.2f}B params, seq_len {r['seq_len']}, global batch "
          f"{r['global_batch']}, attention {r['attention']}, remat {r['remat']}, {where}, mesh "
          f"{r['mesh']}")
  if r.get('compile_error'):
    need = r['total_bytes_per_device']
    return '\n'.join([
        head, f"[aot] DOES NOT FIT: the TPU compiler needs "
        f"{gib(need) if need else 'more than'} for temporaries alone, of "
        f"{gib(r['hbm_bytes_per_device'])} HBM per chip ({r['compile_error']})"])
  lines = [
      f"{head}: {gib(r['total_bytes_per_device'])} per device (arguments "
      f"{gib(r['argument_bytes'])}, outputs {gib(r['output_bytes'])}, temporaries "
      f"{gib(r['temp_bytes'])}, aliased {gib(r['alias_bytes'])})"]
  if r['hbm_bytes_per_device']:
    verdict = 'FITS' if r['fits'] else 'DOES NOT FIT'
    lines.append(f"[aot] {verdict}: {gib(r['total_bytes_per_device'])} of "
                 f"{gib(r['hbm_bytes_per_device'])} HBM per chip "
                 f"({100 * r['total_bytes_per_device'] / r['hbm_bytes_per_device']:.0f}%)")
  f = r['compiler_flops_per_device']
  lines.append(f"[aot] FLOPs per step: model {r['model_flops_per_step']:.3e} (jaxlm.flops), "
               f"compiled {f * r['devices']:.3e} ({f:.3e} per device)" if f else
               f"[aot] FLOPs per step: model {r['model_flops_per_step']:.3e} (jaxlm.flops); "
               f"the compiler gave no estimate")
  if r['step_time_lower_bound_s']:
    t = r['step_time_lower_bound_s']
    lines.append(f"[aot] step time >= {t:.3f} s" if t >= 0.1 else
                 f"[aot] step time >= {1e3 * t:.3f} ms")
    lines[-1] += (f" at peak ({r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per chip); "
                  f"MFU <= {100 * r['mfu_upper_bound']:.0f}%")
  return '\n'.join(lines)
