"""The figures people look at: accuracy against gold position (several runs on one
figure, as in the paper's MDQA plots) and synthetic accuracy by position and length."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def position_curves(runs: dict[str, list[dict[str, Any]]], path: str, *, suite: str,
                    metric: str, group_key: str | None = None, title: str | None = None) -> bool:
  """One line per (run, group) of `metric` against gold_position, with standard-error bars
  where the scores carry `stderr`. Returns False (and writes nothing) when no run has such
  scores."""
  fig, ax = plt.subplots(figsize=(6, 3.8))
  drawn = False
  for run_name, scores in runs.items():
    rows = [s for s in scores if s['suite'] == suite and s['metric'] == metric
            and isinstance(s.get('gold_position'), (int, float)) and s.get('variant', 'haystack')
            == 'haystack']
    groups = sorted({s.get(group_key) for s in rows}, key=str) if group_key else [None]
    for g in groups:
      pts = sorted((s['gold_position'], s['value'], s.get('stderr')) for s in rows
                   if group_key is None or s.get(group_key) == g)
      if not pts:
        continue
      label = run_name if g is None or len(groups) == 1 else f'{run_name} ({group_key}={g})'
      errs = [e if isinstance(e, float) and e == e else 0.0 for _, _, e in pts]
      ax.errorbar([p for p, _, _ in pts], [v for _, v, _ in pts], yerr=errs if any(errs) else None,
                  fmt='o-', capsize=3, label=label)
      drawn = True
  if not drawn:
    plt.close(fig)
    return False
  ax.set_xlabel('position of the gold document / pair')
  ax.set_ylabel(metric)
  ax.set_ylim(-0.02, 1.02)
  ax.grid(True, alpha=0.3)
  ax.set_title(title or f'{suite}: {metric} by gold position')
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def heatmap(grid: list[tuple[int, int, float]], path: str, title: str) -> None:
  """grid: (length, gold position, accuracy) triples; positions are shown as depth bins
  when lengths differ, so each row spans its own dictionaries."""
  lengths = sorted({n for n, _, _ in grid})
  positions = sorted({p for _, p, _ in grid})
  z = np.full((len(lengths), len(positions)), np.nan)
  for n, p, v in grid:
    z[lengths.index(n), positions.index(p)] = v
  fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(positions), 1.2 + 0.5 * len(lengths)))
  im = ax.imshow(z, vmin=0, vmax=1, cmap='viridis', aspect='auto', origin='lower')
  ax.set_xticks(range(len(positions)), [str(p) for p in positions])
  ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_xlabel('gold dictionary index')
  ax.set_ylabel('number of dictionaries')
  for i in range(len(lengths)):
    for j in range(len(positions)):
      if not np.isnan(z[i, j]):
        ax.text(j, i, f'{z[i, j]:.2f}', ha='center', va='center',
                color='white' if z[i, j] < 0.6 else 'black', fontsize=8)
  fig.colorbar(im, ax=ax, label='accuracy')
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
