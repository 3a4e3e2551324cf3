"""Result tables of sweeps and studies: one list of row dicts -> CSV and Markdown."""

from __future__ import annotations

import csv
from typing import Any, Sequence


def fmt(v: Any) -> str:
  """A table cell: '' for missing, 4 significant digits for floats, yes/NO for booleans."""
  if v is None:
    return ''
  if isinstance(v, bool):
    return 'yes' if v else 'NO'
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def write_table(stem: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
  """Write STEM.csv and STEM.md with `columns` of `rows`; returns the Markdown."""
  with open(f'{stem}.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(columns))
    w.writeheader()
    for r in rows:
      w.writerow({k: fmt(r.get(k)) for k in columns})
  md = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  md += ['| ' + ' | '.join(fmt(r.get(k)) for k in columns) + ' |' for r in rows]
  text = '\n'.join(md) + '\n'
  with open(f'{stem}.md', 'w') as f:
    f.write(text)
  return text
