"""How fast does a tiny Mistral learn associative recall? The CPU demo's bottleneck, isolated.

The demo (configs/tiny_kv.py) has to learn key matching from scratch in ten CPU minutes.
This script strips the task to its core, multi-query associative recall on random token
ids, and trains the same jaxlm Mistral on it, so the factors that decide how many steps
matching takes can be varied one at a time:

  --pairs      key-value pairs per sequence (the distractors)
  --keys       distinct key tokens; --values: distinct value tokens (disjoint id ranges)
  --format     how a pair and a query look (the query is `Q k ...`, its value is the target):
               adjacent:  context `k v`,   query `Q k -> v`  (the key is the current token
                          when the value is predicted: one induction step)
               separator: context `k : v`, query `Q k is -> v` (the paper's layout: the key is
                          one token back on the query side, two on the context side)
               shifted:   context `k v`,   query `Q k is -> v`
  --dicts      split the pairs into this many groups, each opened by its own header token
               (`Dictionary [i]` in miniature: pairs no longer sit on a fixed position grid)
  --distinct_values  draw the values without replacement (no two pairs share a value)
  --mapped_query  the query names key k by a different token (id k + --keys), so the model
               must learn which query token goes with which context key (with --ask=index:
               names value v by another token, as the piece `V and it is in Dictionary [`
               does); as with a
               tokenizer that has the pieces `K: ` and `K is ` for every key)
  --ask=index  the query `Q v` asks for the group (`--dicts`) whose pair holds value v, and
               the target is that group's header token: the demo's dictionary index, a
               two-hop lookup (pair -> its header); needs --distinct_values.
               --ask=both: each pair is asked for its value, then its index (as the demo)
  --pair_tokens  each pair is one token (as with data/tokenizers/kv-tiny-pairs.model)
  --compose    with --pair_tokens: each pair token's embedding starts as the scaled sum of its
               key's, its value's and the separator's (jaxlm/demo/embed_init.py, the trainer's
               `embed_init='compose'`), instead of an unrelated random row
  --index_as_digit  the index answer is the group's number i+1 written as the value token
               VALUE0+i+1 instead of the header token, as the demo answers `[2]` with the
               digit that values use too; with --compose the header then starts from a
               common `Dictionary [` part plus that digit's row, like `Dictionary [2] {`
  --header_loss  also supervise every header after the first (predicting it needs the
               number of headers so far, the feature --ask=index reads from the pair)
  --then_format, --switch_at  a curriculum: --format for the first --switch_at steps, then
               --then_format (does a circuit learned in the easy layout carry over?)

Every pair is queried once, in random order, after the context; loss and accuracy are on
the value tokens only. `--model=reference` trains a minimal pre-norm transformer written
here in plain jax (RoPE, SwiGLU, untied head, same sizes) instead of jaxlm's Mistral: an
independent check that slow learning is a property of the task, not of jaxlm. Prints a line per tenth of the run with loss, accuracy (of the queries' targets) and
time, and the step at which accuracy first reached --target.

  python -m jaxlm.demo.recall --pairs=8 --keys=10 --values=10 --format=adjacent
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm import model as mistral
from jaxlm.demo.embed_init import compose_embeddings

FORMATS = ('adjacent', 'separator', 'shifted')
SEP, QUERY, IS = 300, 301, 302   # token ids of ':', the query marker and 'is'
KEY0, VALUE0 = 3, 150            # keys are ids KEY0.., values VALUE0.. (disjoint ranges)
HEADER0 = 310                    # group headers HEADER0 + i
HEADER_PART = 303                # --index_as_digit --compose: the part all headers share
PAIR0 = 384                      # --pair_tokens: pair (k, v) is PAIR0 + k * values + v


def make_batch(rng: np.random.Generator, batch: int, pairs: int, keys: int, values: int,
               fmt: str, dicts: int = 0, distinct_values: bool = False,
               mapped_query: bool = False, ask: str = 'value', pair_tokens: bool = False,
               header_loss: bool = False, index_as_digit: bool = False):
  rows, masks = [], []
  per = pairs // dicts if dicts else pairs
  for _ in range(batch):
    k = rng.choice(keys, pairs, replace=False) + KEY0
    v = (rng.choice(values, pairs, replace=False) if distinct_values
         else rng.integers(0, values, pairs)) + VALUE0
    toks, mask = [], []
    for i, (a, b) in enumerate(zip(k, v)):
      if dicts and i % per == 0:
        toks.append(HEADER0 + i // per)
        mask.append(2 if header_loss and i > 0 else 0)   # 2: supervised, not scored
      if pair_tokens:
        pair = [PAIR0 + (a - KEY0) * values + (b - VALUE0)]
      else:
        pair = [a, SEP, b] if fmt == 'separator' else [a, b]
      toks += pair
      mask += [0] * len(pair)
    for j in rng.permutation(pairs):
      for kind in (('value', 'index') if ask == 'both' else (ask,)):
        if kind == 'index':
          qv = v[j] + values if mapped_query else v[j]   # mapped: another token names v
          q = [QUERY, qv]
          target = VALUE0 + j // per + 1 if index_as_digit else HEADER0 + j // per
        else:
          qk = k[j] + keys if mapped_query else k[j]
          q, target = ([QUERY, qk] if fmt == 'adjacent' else [QUERY, qk, IS]), v[j]
        toks += q + [target]
        mask += [0] * len(q) + [1]
    rows.append(toks)
    masks.append(mask)
  t, m = np.array(rows, np.int32), np.array(masks, np.float32)
  return t[:, :-1], t[:, 1:], m[:, 1:]


class Reference(nnx.Module):
  """A minimal causal transformer in plain jax ops, independent of jaxlm.model."""

  def __init__(self, vocab: int, hidden: int, layers: int, heads: int, init: float,
               rngs: nnx.Rngs):
    w = lambda *shape: nnx.Param(init * jax.random.normal(rngs.params(), shape))
    self.heads, self.layers = heads, layers
    self.embed, self.head = w(vocab, hidden), w(hidden, vocab)
    self.qkv = nnx.List([w(hidden, 3 * hidden) for _ in range(layers)])
    self.out = nnx.List([w(hidden, hidden) for _ in range(layers)])
    self.up = nnx.List([w(hidden, 4 * hidden) for _ in range(layers)])
    self.down = nnx.List([w(2 * hidden, hidden) for _ in range(layers)])

  def __call__(self, tokens, positions):
    norm = lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5)
    h = self.embed[...][tokens]
    b, t, d = h.shape
    hd = d // self.heads
    angle = positions[..., None] * 1e4 ** (-jnp.arange(0, hd, 2) / hd)
    cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]

    def rope(x):
      x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
      return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    for i in range(self.layers):
      q, k, v = jnp.split(norm(h) @ self.qkv[i][...], 3, -1)
      q, k, v = (z.reshape(b, t, self.heads, hd) for z in (q, k, v))
      a = jax.nn.dot_product_attention(rope(q), rope(k), v, is_causal=True)
      h = h + a.reshape(b, t, d) @ self.out[i][...]
      gate, up = jnp.split(norm(h) @ self.up[i][...], 2, -1)
      h = h + (jax.nn.silu(gate) * up) @ self.down[i][...]
    return norm(h) @ self.head[...]


def run(pairs: int = 8, keys: int = 10, values: int = 10, fmt: str = 'adjacent',
        steps: int = 1200, batch: int = 32, lr: float = 3e-3, layers: int = 2,
        hidden: int = 64, heads: int = 4, init: float = 0.125, seed: int = 0,
        target: float = 0.95, model_name: str = 'jaxlm', dicts: int = 0,
        distinct_values: bool = False, then_format: str | None = None, switch_at: int = 0,
        mapped_query: bool = False, ask: str = 'value', pair_tokens: bool = False,
        header_loss: bool = False, compose: bool = False, index_as_digit: bool = False,
        log=print) -> dict:
  for name, f in (('format', fmt), ('then_format', then_format or fmt)):
    if f not in FORMATS:
      raise ValueError(f'--{name}={f!r} must be one of {FORMATS}')
  if dicts and (pairs % dicts or dicts > 384 - HEADER0):
    raise ValueError(f'--dicts={dicts} must divide --pairs={pairs} and be <= {384 - HEADER0}')
  if mapped_query and ask == 'index' and 2 * values > SEP - VALUE0:
    raise ValueError(f'--mapped_query with --ask=index needs 2 * --values <= {SEP - VALUE0}')
  if mapped_query and 2 * keys > VALUE0 - KEY0:
    raise ValueError(f'--mapped_query needs 2 * --keys <= {VALUE0 - KEY0}, got --keys={keys}')
  if ask not in ('value', 'index', 'both'):
    raise ValueError(f"--ask={ask!r} must be 'value', 'index' or 'both'")
  if ask != 'value' and not (dicts and distinct_values):
    raise ValueError(f'--ask={ask} needs --dicts (the groups to name) and --distinct_values '
                     '(a value must name one pair)')
  if index_as_digit and (ask == 'value' or dicts >= values):
    raise ValueError(f'--index_as_digit needs --ask=index or both and --dicts={dicts} < '
                     f'--values={values} (group i is answered by value token i+1)')
  if compose and not pair_tokens:
    raise ValueError('--compose needs --pair_tokens (the pieces it composes)')
  if header_loss and not dicts:
    raise ValueError('--header_loss needs --dicts')
  if distinct_values and values < pairs:
    raise ValueError(f'--distinct_values needs --values={values} >= --pairs={pairs}')
  if keys < pairs:
    raise ValueError(f'--keys={keys} is fewer than --pairs={pairs}: keys must be distinct')
  if keys > VALUE0 - KEY0 or values > SEP - VALUE0:
    raise ValueError(f'--keys={keys} must be <= {VALUE0 - KEY0} and --values={values} '
                     f'<= {SEP - VALUE0}')
  if hidden % heads:
    raise ValueError(f'--hidden={hidden} is not divisible by --heads={heads}')
  vocab = PAIR0 + keys * values if pair_tokens else 384
  cfg = mistral.MistralConfig(
      vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
      num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=2 * hidden,
      sliding_window=None, max_position_embeddings=1024, initializer_range=init)
  if model_name == 'jaxlm':
    model = mistral.init_model(cfg, seed)
  elif model_name == 'reference':
    model = Reference(vocab, hidden, layers, heads, init, nnx.Rngs(seed))
  else:
    raise ValueError(f"--model={model_name!r} must be 'jaxlm' or 'reference'")
  if compose:
    splits = {PAIR0 + a * values + b: (KEY0 + a, VALUE0 + b, SEP)
              for a in range(keys) for b in range(values)}
    if index_as_digit:
      splits.update({HEADER0 + i: (HEADER_PART, VALUE0 + i + 1) for i in range(dicts)})
    model.embed[...] = jnp.asarray(compose_embeddings(np.asarray(model.embed[...]), splits))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps)
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)
  rng = np.random.default_rng(seed)

  @nnx.jit
  def step(model, optimizer, x, y, m):
    def loss_fn(model):
      logits = model(x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape))
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      scored = (m == 1).astype(jnp.float32)   # the queries' targets; 2 marks header targets
      acc = jnp.sum((logits.argmax(-1) == y) * scored) / jnp.sum(scored)
      supervised = (m > 0).astype(jnp.float32)
      return jnp.sum(ce * supervised) / jnp.sum(supervised), acc
    (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, acc

  t0, reached, history = time.perf_counter(), None, []
  every = max(1, steps // 10)
  for i in range(1, steps + 1):
    f = then_format if then_format and i > switch_at else fmt
    if then_format and i == switch_at + 1:
      log(f'[recall] step {i}: switching from --format={fmt} to {then_format}')
      reached = None   # the target now counts in the new layout
    loss, acc = step(model, optimizer, *map(jnp.asarray, make_batch(
        rng, batch, pairs, keys, values, f, dicts, distinct_values, mapped_query, ask,
        pair_tokens, header_loss, index_as_digit)))
    if i % every == 0 or i == steps:
      loss, acc = float(loss), float(acc)
      history.append({'step': i, 'loss': loss, 'accuracy': acc})
      if reached is None and acc >= target:
        reached = i
      elapsed = time.perf_counter() - t0
      log(f'[recall] step {i}/{steps} loss {loss:.3f} accuracy {acc:.3f} '
          f'{i / elapsed:.1f} steps/s ETA {(steps - i) * elapsed / i:.0f}s')
  return {'model': model_name, 'pairs': pairs, 'keys': keys, 'values': values, 'format': fmt,
          'then_format': then_format, 'dicts': dicts, 'mapped_query': mapped_query,
          'distinct_values': distinct_values, 'ask': ask, 'pair_tokens': pair_tokens,
          'header_loss': header_loss, 'compose': compose, 'index_as_digit': index_as_digit,
          'steps': steps,
          'final_accuracy': history[-1]['accuracy'], 'reached_target_at': reached,
          'history': history}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--pairs', type=int, default=8)
  p.add_argument('--keys', type=int, default=10)
  p.add_argument('--values', type=int, default=10)
  p.add_argument('--format', default='adjacent', choices=FORMATS)
  p.add_argument('--steps', type=int, default=1200)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--lr', type=float, default=3e-3)
  p.add_argument('--layers', type=int, default=2)
  p.add_argument('--hidden', type=int, default=64)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--init', type=float, default=0.125)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--target', type=float, default=0.95)
  p.add_argument('--model', default='jaxlm', choices=('jaxlm', 'reference'))
  p.add_argument('--dicts', type=int, default=0)
  p.add_argument('--distinct_values', action='store_true')
  p.add_argument('--mapped_query', action='store_true')
  p.add_argument('--then_format', default=None, choices=FORMATS)
  p.add_argument('--switch_at', type=int, default=0)
  p.add_argument('--ask', default='value', choices=('value', 'index', 'both'))
  p.add_argument('--pair_tokens', action='store_true')
  p.add_argument('--header_loss', action='store_true')
  p.add_argument('--compose', action='store_true')
  p.add_argument('--index_as_digit', action='store_true')
  a = p.parse_args(argv)
  r = run(a.pairs, a.keys, a.values, a.format, a.steps, a.batch, a.lr, a.layers, a.hidden,
          a.heads, a.init, a.seed, a.target, a.model, a.dicts, a.distinct_values,
          a.then_format, a.switch_at, a.mapped_query, a.ask, a.pair_tokens, a.header_loss,
          a.compose, a.index_as_digit)
  print(f"[recall] {r['model']} pairs={r['pairs']} keys={r['keys']} values={r['values']} "
        f"dicts={r['dicts']} distinct_values={r['distinct_values']} "
        f"mapped_query={r['mapped_query']} ask={r['ask']} pair_tokens={r['pair_tokens']} "
        f"header_loss={r['header_loss']} compose={r['compose']} "
        f"index_as_digit={r['index_as_digit']} format={r['format']}"
        + (f"->{r['then_format']}@{a.switch_at}" if r['then_format'] else '')
        + f": final accuracy {r['final_accuracy']:.3f}, "
        f"reached {a.target:.0%} at step {r['reached_target_at']}")


if __name__ == '__main__':
  main()
