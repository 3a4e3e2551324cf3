"""What a run trains: every parameter, the top layers only, or LoRA adapters.

`train.trainable_layers = n > 0` (partial fine-tuning, "freeze tuning" in LLaMA-Factory's
words) trains the last n transformer layers and the final norm. The embedding table, the
output head (tied or not) and the layers below stay as loaded: no gradient, no optimizer
state, and no backward pass below the lowest trained layer (jax.grad differentiates only
what depends on the trained parameters, so the frozen layers run forward only). A step then
costs the forward pass, twice the trained layers' forward, and the head's input gradient
(`jaxlm.flops` counts it so). 0 = full fine-tuning. The layers must be unrolled: with
`model.scan_layers` every weight is one array stacked over all layers.

`train.lora.rank > 0` trains LoRA adapters instead (jaxlm.lora); the two do not combine.
"""

from __future__ import annotations

from flax import nnx

from jaxlm import lora


class FreezeError(ValueError):
  """A train.trainable_layers setting that cannot apply (the message names the field)."""


def trainable_layers(c) -> int:
  return int(c.train.get('trainable_layers', 0) or 0)


def check(c, cfg=None) -> None:
  """train.trainable_layers against the rest of the run config (and the model config,
  once known): a FreezeError naming the field and the value."""
  n = c.train.get('trainable_layers', 0)
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise FreezeError(f'train.trainable_layers={n!r}: must be an integer >= 0 '
                      '(0: train every parameter)')
  if not n:
    return
  if lora.LoRAConfig.from_config(c).enabled:
    raise FreezeError(f'train.trainable_layers={n} and train.lora.rank='
                      f'{c.train.lora.rank}: choose one (LoRA trains adapters on every layer)')
  scan = cfg.scan_layers if cfg is not None else c.model.get('scan_layers', False)
  if scan:
    raise FreezeError(f'train.trainable_layers={n} needs model.scan_layers=False: scanned '
                      'layers keep each weight in one array stacked over all layers')
  if cfg is not None and n > cfg.num_layers:
    raise FreezeError(f'train.trainable_layers={n}: the model has {cfg.num_layers} layers')


def trainable_filter(c, cfg):
  """The nnx filter of what a run differentiates and gives optimizer state to."""
  lcfg = lora.LoRAConfig.from_config(c)
  if lcfg.enabled:
    return lora.TRAINABLE
  n = trainable_layers(c)
  if not n:
    return nnx.Param
  first = cfg.num_layers - n

  def trained(path, _):
    return ((path[0] == 'layers' and int(path[1]) >= first) or path[0] == 'final_norm')
  return nnx.All(nnx.Param, trained)

