"""The benchmark scripts still run (tiny sizes; their numbers live in BENCHMARKS.md)."""
import pytest

from jaxlm.bench import attention_check, data, mfu, step


def test_step_benchmark_runs(capsys):
  step.main(['--preset', 'tiny', '--batch', '1', '--seq', '16', '--steps', '1', '--warmup', '1',
             '--no_torch_compile', '--attention', 'dense,auto', '--lora', '2'])
  out = capsys.readouterr().out
  assert 'jaxlm (jax.jit, dense attention, LoRA rank 2 on every projection)' in out
  assert 'jaxlm dense LoRA / torch throughput ratio' in out
  assert 'jaxlm (jax.jit, dense attention)' in out and 'throughput ratio' in out
  assert 'jaxlm (jax.jit, auto = chunked attention)' in out      # what auto picks on CPU
  assert 'jaxlm dense / torch throughput ratio' in out
  assert 'jaxlm auto / torch throughput ratio' in out
  with pytest.raises(SystemExit):
    step.main(['--attention', 'dense,flash'])


def test_step_benchmark_answer_only_loss_and_smollm2_shape(capsys, monkeypatch):
  import jax
  import numpy as np
  import torch
  from flax import nnx
  from jaxlm.model import get_config, init_model
  # The answer-only loss (head at the last K positions only) equals the full-logit masked
  # loss, values and gradients, on a tied-embedding llama model.
  cfg = get_config('tiny', architecture='llama', tie_word_embeddings=True, sliding_window=None,
                   num_layers=1)
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (3, 13))
  both = nnx.jit(lambda m, t: (nnx.value_and_grad(step.loss_fn)(m, t, 4),
                               nnx.value_and_grad(step.masked_full_loss)(m, t, 4),
                               step.loss_fn(m, t, 0)))
  (got, got_g), (want, want_g), every_token = both(init_model(cfg), tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert abs(float(got) - float(every_token)) > 1e-4   # and not the every-token loss
  # The PyTorch rows compute the same answer-only loss both ways.
  tcfg = get_config('tiny', vocab_size=64, num_layers=1)
  losses = [step.torch_step(step.torch_model(tcfg), tokens % 64, 5, head)().item()
            for head in (False, True)]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
  # The CLI with the SmolLM2 shape cut to one layer; a torch.compile that fails is a table row.
  monkeypatch.setattr(torch, 'compile', lambda m: (_ for _ in ()).throw(RuntimeError('no')))
  step.main(['--shape', 'smollm2-135m', '--layers', '1', '--vocab', '256', '--batch', '1',
             '--seq', '16', '--answer_tokens', '4', '--steps', '1', '--warmup', '1'])
  out = capsys.readouterr().out
  assert 'llama, 1 layers' in out and 'mean over the last 4 targets' in out
  assert 'jaxlm (jax.jit, auto = chunked attention, head at the 4 answer positions)' in out
  assert 'labels -100 outside the answer' in out and 'head at the answer positions only' in out
  assert out.count('| failed: RuntimeError: no |') == 2
  assert 'jaxlm / torch throughput ratio' in out
  assert 'jaxlm / torch (head at answer) throughput ratio' in out


def test_mfu_benchmark_runs_the_trainer_step_and_counts_flops(tmp_path, capsys):
  from jaxlm import flops
  rows = mfu.main(['--tiny', '--seq_lens=128', '--warmup=1', '--steps=1', '--peak=1e12',
                   f'--out={tmp_path}/mfu'])
  (row,) = rows
  assert row['devices'] == 8 and row['tokens_per_s_per_chip'] > 0   # the 8 simulated devices
  cfg = mfu.model_config(2, 128, True, 'auto')
  want = row['tokens_per_s_per_chip'] * flops.train_flops_per_token(cfg, 128) / 1e12
  assert abs(row['model_tflops_per_chip'] - want) < 1e-9 * max(1.0, want)
  assert abs(row['mfu'] - row['model_tflops_per_chip'] / 1.0) < 1e-12   # peak 1 TFLOP/s
  assert (tmp_path / 'mfu.md').read_text().startswith('| device | devices | layers')
  assert 'causal once' in capsys.readouterr().out


def test_data_benchmark_runs(capsys):
  data.main(['--budgets', '512', '--tasks', 'simple_kv', '--seconds', '0.05'])
  assert '| simple_kv | 512 |' in capsys.readouterr().out


def test_data_benchmark_times_a_trainer_configs_batches(capsys):
  data.main(['--config', 'tests/train_config.py', '--threads', '0,1', '--batches', '3'])
  rows = [l.split('|') for l in capsys.readouterr().out.splitlines() if l.startswith('| 0 ') or
          l.startswith('| 1 ')]
  assert len(rows) == 2 and all(float(r[2]) > 0 for r in rows)
  assert rows[0][4] == rows[1][4] and int(rows[0][4].replace(',', '')) > 0   # same stream


def test_attention_check_runs(capsys):
  attention_check.main(['--seq', '64', '--heads', '2', '--kv_heads', '1', '--head_dim', '16',
                        '--runs', '1', '--window', '8'])
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if l.startswith('| blockwise')]
  assert rows and all(float(x) < 1e-4 for x in rows[0].split('|')[2:6])


def test_evaluation_throughput_benchmark_runs(capsys):
  from jaxlm.bench import evaluate
  evaluate.main(['--preset', 'tiny', '--prompt', '16', '--batch', '2', '--new', '3',
                 '--repeats', '1', '--scan_layers'])
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if l.startswith('| MDQA 20 docs')]
  assert rows and all(float(x) > 0 for x in rows[0].split('|')[2:4])
  prefill = [l for l in out.splitlines() if l.startswith('| over the ')]
  assert len(prefill) == 3 and 'prefill speed-up over the reference' in out
  assert 'scanned layers |' in prefill[2] and 'scanned layers / unrolled' in out


def test_recall_batches_ask_every_key_for_its_own_value():
  import numpy as np
  from jaxlm.bench import recall
  for fmt, stride in (('adjacent', 2), ('separator', 3), ('shifted', 2)):
    x, y, m = recall.make_batch(np.random.default_rng(0), 3, 5, 7, 9, fmt)
    tokens = np.concatenate([x[:, :1], y], 1)
    for row, mask in zip(tokens, m):
      context = {int(row[i]): int(row[i + stride - 1]) for i in range(0, 5 * stride, stride)}
      assert len(context) == 5   # distinct keys
      answers = np.flatnonzero(mask) + 1   # target t+1 is the masked one
      assert len(answers) == 5
      key_back = 1 if fmt == 'adjacent' else 2
      assert {int(row[a - key_back]): int(row[a]) for a in answers} == context


def test_recall_headers_and_distinct_values():
  import numpy as np
  from jaxlm.bench import recall
  x, y, m = recall.make_batch(np.random.default_rng(0), 4, 6, 8, 6, 'adjacent', dicts=3,
                              distinct_values=True)
  tokens = np.concatenate([x[:, :1], y], 1)
  for row, mask in zip(tokens, m):
    context = row[:6 * 2 + 3]
    assert [int(t) for t in context[::5]] == [recall.HEADER0 + i for i in range(3)]
    values = [int(t) for t in context if recall.VALUE0 <= t < recall.SEP]
    assert sorted(values) == list(range(recall.VALUE0, recall.VALUE0 + 6))   # a permutation
    answers = np.flatnonzero(mask) + 1
    pairs = {int(context[i]): int(context[i + 1]) for i in range(len(context) - 1)
             if recall.KEY0 <= context[i] < recall.VALUE0}
    assert {int(row[a - 1]): int(row[a]) for a in answers} == pairs
  with pytest.raises(ValueError, match='--dicts=4 must divide --pairs=6'):
    recall.run(pairs=6, dicts=4, steps=1)


def test_recall_index_queries_pair_tokens_and_header_loss():
  import numpy as np
  from jaxlm.bench import recall
  keys, values = 8, 6
  x, y, m = recall.make_batch(np.random.default_rng(0), 4, 6, keys, values, 'adjacent', dicts=3,
                              distinct_values=True, ask='index', pair_tokens=True,
                              header_loss=True)
  tokens = np.concatenate([x[:, :1], y], 1)
  full = np.concatenate([np.zeros((4, 1)), m], 1)   # mask of token t (not target t)
  for row, mask in zip(tokens, full):
    context = [int(t) for t in row[:6 + 3]]
    group, owner = -1, {}
    for t in context:
      if recall.HEADER0 <= t < recall.PAIR0:
        group = t - recall.HEADER0
      else:
        assert t >= recall.PAIR0   # a pair is one token
        owner[recall.VALUE0 + (t - recall.PAIR0) % values] = recall.HEADER0 + group
    assert group == 2 and len(owner) == 6
    assert [int(v) for v in mask[:9]] == [0, 0, 0, 2, 0, 0, 2, 0, 0]   # headers 2, 3 supervised
    answers = np.flatnonzero(mask == 1)
    assert len(answers) == 6
    assert {int(row[a - 1]): int(row[a]) for a in answers} == owner   # `Q v` -> its header
  x, y, m = recall.make_batch(np.random.default_rng(0), 2, 6, keys, values, 'adjacent', dicts=3,
                              distinct_values=True, ask='index', mapped_query=True)
  tokens = np.concatenate([x[:, :1], y], 1)
  for row, mask in zip(tokens, m):
    context = [int(t) for t in row[:6 * 2 + 3]]
    for a in np.flatnonzero(mask) + 1:   # `Q v'` names value v by the token v + values
      v = int(row[a - 1]) - values
      assert v in context and row[a] == max(t for t in context[:context.index(v)]
                                            if t >= recall.HEADER0)
  x, y, m = recall.make_batch(np.random.default_rng(0), 2, 6, keys, values, 'adjacent', dicts=3,
                              distinct_values=True, ask='both', pair_tokens=True)
  assert (m == 1).sum(1).tolist() == [12, 12]   # each pair asked for its value and its index
  with pytest.raises(ValueError, match='--ask=index needs --dicts'):
    recall.run(ask='index', steps=1)


def test_recall_benchmark_learns_the_easy_case(capsys):
  from jaxlm.bench import recall
  # Two pairs, adjacent layout. A model that cannot match keys scores at most ~75% in
  # expectation (a coin flip on the first query, elimination on the second); 90% of 64
  # answers is out of its reach (p < 0.002), and the real model gets there in ~120 steps.
  recall.main(['--pairs', '2', '--keys', '4', '--values', '4', '--steps', '300',
               '--target', '0.9', '--seed', '1'])
  out = capsys.readouterr().out
  assert 'reached 90% at step None' not in out, out


def test_recall_compose_starts_pairs_from_key_value_and_separator():
  from jaxlm.bench import recall
  with pytest.raises(ValueError, match='--compose needs --pair_tokens'):
    recall.run(pairs=4, steps=1, compose=True)
  with pytest.raises(ValueError, match='--index_as_digit needs'):
    recall.run(pairs=4, dicts=2, distinct_values=True, index_as_digit=True, steps=1)
  r = recall.run(pairs=4, keys=5, values=5, dicts=2, distinct_values=True, ask='index',
                 pair_tokens=True, compose=True, index_as_digit=True, steps=1, log=lambda s: None)
  assert r['compose'] and len(r['history']) == 1


def test_recall_index_as_digit_answers_with_the_group_number():
  import numpy as np
  from jaxlm.bench import recall
  x, y, m = recall.make_batch(np.random.default_rng(0), 3, 6, 8, 6, 'adjacent', dicts=3,
                              distinct_values=True, ask='index', pair_tokens=True,
                              index_as_digit=True)
  tokens = np.concatenate([x[:, :1], y], 1)
  for row, mask in zip(tokens, m):
    group, owner = -1, {}
    for t in row[:6 + 3]:
      if recall.HEADER0 <= t < recall.PAIR0:
        group = int(t) - recall.HEADER0
      else:
        owner[recall.VALUE0 + (int(t) - recall.PAIR0) % 6] = group
    answers = np.flatnonzero(mask) + 1
    assert len(answers) == 6
    assert all(int(row[a]) == recall.VALUE0 + owner[int(row[a - 1])] + 1 for a in answers)


def test_multiple_choice_benchmark_runs_and_both_paths_agree(capsys):
  from jaxlm.bench import mc
  r = mc.main(['--preset', 'tiny', '--questions', '3', '--repeats', '1', '--batch', '2',
               '--shape', 'hellaswag'])
  assert r['max_abs_diff'] < 1e-3 and r['shared_s'] > 0
  assert 'speed-up' in capsys.readouterr().out


def test_load_benchmark_times_each_part_of_a_gguf_start_up(capsys):
  from conftest import embedded_file
  from jaxlm.bench import load
  out = dict(load.main(['--gguf', embedded_file(), '--repeats', '1']))
  assert len(out) == 4 and all(s > 0 for s in out.values())
  assert '| weights: convert.load_gguf (float32) |' in capsys.readouterr().out
