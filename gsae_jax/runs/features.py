"""The feature browser: one pass of an SAE over a shard folder, written as a static site
(`index.html` + one `feature_<i>.html` per feature) that opens from disk: no server, no network,
plain inline JS and SVG."""

from __future__ import annotations

import html
import json
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from gsae_jax.data import shards
from gsae_jax.errors import DataError
from gsae_jax.eval import features as F
from gsae_jax.sae.spec import SAESpec

if TYPE_CHECKING:
  from gsae_jax.lm.language_model import LanguageModel

BATCH = 4096  # rows per encode
SAMPLES = 32  # uniformly sampled active rows kept per feature, for the lower-quantile contexts
LOGIT_K = 10  # promoted and suppressed tokens shown


def unembedding(lm: LanguageModel) -> jax.Array:
  """The LM's unembedding W_U [d_model, vocab] (the embedding transposed when tied)."""
  module = nnx.merge(lm.graphdef, lm.params)
  w = module.embed[...].T if module.unembed is None else module.unembed[...]
  return jnp.asarray(w, jnp.float32)


def collect(params: dict, spec: SAESpec, scale: float, shard_set: shards.ShardSet, top_k: int,
            max_tokens: int | None) -> F.FeatureStats:
  """The per-feature summaries of one pass over the first `max_tokens` rows (all by default)."""
  n_rows = shard_set.num_tokens
  n = n_rows if max_tokens is None else min(max_tokens, n_rows)
  batch = min(BATCH, n)
  fn = F.batch_summary_fn(spec.graphdef, top_k, SAMPLES)
  params = jax.device_put(params)
  stats = F.FeatureStats.empty(spec.d_sae, top_k, SAMPLES)
  for lo in tqdm(range(0, n, batch), desc="features", unit="batch"):
    # Context rows on both sides travel with the batch, so every kept row has its neighbours'
    # activations; rows beyond the folder are clamped here and masked by `context_valid` later.
    rows = np.clip(np.arange(lo - F.BEFORE, lo + batch + F.AFTER), 0, n_rows - 1)
    x = np.asarray(shard_set.gather(rows), np.float32) * np.float32(scale)
    n_valid = min(batch, n - lo)
    # first_row only seeds the sampling hash: mod 2^31 keeps it an int32 on any folder size.
    stats = stats.update(fn(params, x, np.int32(lo % 2**31), np.int32(n_valid)), lo, n_valid)
  return stats


class _Contexts:
  """Token ids and windows of rows, read from the folder's ctx files (memory-mapped)."""

  def __init__(self, shard_set: shards.ShardSet):
    self.shard_set = shard_set
    self.maps = [np.memmap(os.path.join(shard_set.folder, e["ctx_file"]), np.int32, "r",
                           shape=(e["tokens"], len(shards.CTX_COLUMNS)))
                 for e in shard_set.manifest["shards"]]

  def tokens(self, kept: F.Kept, i: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Feature i's non-empty kept rows as (token ids, activations, is-centre) per context."""
    live = kept.value[i] > 0
    rows, acts = kept.row[i][live], kept.context[i][live]
    if not len(rows):
      return []
    n_rows = self.shard_set.num_tokens
    ctx_rows = np.clip(rows[:, None] + np.arange(-F.BEFORE, F.AFTER + 1), 0, n_rows - 1)
    flat = ctx_rows.ravel()
    shard = self.shard_set.shard_of(flat)
    ctx = np.empty((len(flat), len(shards.CTX_COLUMNS)), np.int32)
    for s in np.unique(shard):
      at = shard == s
      ctx[at] = self.maps[s][flat[at] - self.shard_set.offsets[s]]
    ctx = ctx.reshape(ctx_rows.shape + (-1,))
    valid = F.context_valid(rows, ctx[..., 0], n_rows)
    centre = np.arange(F.WIDTH) == F.BEFORE
    return [(ctx[j, v, 2], acts[j, v], centre[v]) for j, v in enumerate(valid)]


class _Decoder:
  """Token id -> display text, cached (each id is decoded once)."""

  def __init__(self, tokenizer):
    self.tokenizer, self.cache = tokenizer, {}

  def __call__(self, token: int) -> str:
    token = int(token)
    if token not in self.cache:
      text = self.tokenizer.decode([token])
      self.cache[token] = text.replace("\n", "\u23ce") or "\u2205"
    return self.cache[token]


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:right}
th{cursor:pointer;background:#eee;user-select:none}tr:nth-child(even){background:#fafafa}
td.text{text-align:left;font-family:monospace}
.ctx{font-family:monospace;white-space:pre-wrap;margin:3px 0;line-height:1.7}
.act{display:inline-block;width:6em;color:#666}
.tok{border-radius:2px;margin-right:1px}.tok.max{outline:2px solid #c00;font-weight:bold}
.cols{display:flex;gap:3em}.mono{font-family:monospace;white-space:pre}
"""


def _page(title: str, body: str, script: str = "") -> str:
  return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
          f"</title><style>{_STYLE}</style></head><body>\n{body}\n"
          f"{f'<script>{script}</script>' if script else ''}</body></html>\n")


def _context_html(tokens, acts, centre, peak: float, decode: _Decoder, highlight: bool) -> str:
  """One context line: each token shaded by the feature's activation (relative to its max)."""
  spans = []
  for t, a, c in zip(tokens, acts, centre):
    alpha = float(np.clip(a / peak, 0, 1)) if peak > 0 else 0.0
    cls = "tok max" if c and highlight else "tok"
    spans.append(f"<span class='{cls}' title='{a:.4g}' style='background:rgba(255,100,0,"
                 f"{alpha:.2f})'>{html.escape(decode(t))}</span>")
  value = float(acts[np.flatnonzero(centre)[0]])
  return f"<div class='ctx'><span class='act'>{value:.4g}</span>{''.join(spans)}</div>"


def _histogram_svg(counts: np.ndarray) -> str:
  """Bars of the non-empty range of a log10-binned activation histogram."""
  nz = np.flatnonzero(counts)
  if not len(nz):
    return "<p>never active</p>"
  lo, hi = nz[0], nz[-1] + 1
  c, edges = counts[lo:hi], F.hist_edges()[lo:hi + 1]
  w, h, bar = 480, 140, 480 / len(c)
  bars = "".join(f"<rect x='{j * bar:.1f}' y='{h - h * v / c.max():.1f}' width='{bar * 0.9:.1f}' "
                 f"height='{h * v / c.max():.1f}' fill='#e86a10'><title>[{edges[j]:.3g}, "
                 f"{edges[j + 1]:.3g}): {v}</title></rect>" for j, v in enumerate(c))
  return (f"<svg width='{w}' height='{h + 20}' xmlns='http://www.w3.org/2000/svg'>{bars}"
          f"<text x='0' y='{h + 15}' font-size='11'>{edges[0]:.3g}</text>"
          f"<text x='{w}' y='{h + 15}' font-size='11' text-anchor='end'>{edges[-1]:.3g} "
          f"(log scale; max count {c.max()})</text></svg>")


def _logit_html(ids, logits, decode: _Decoder) -> str:
  return "".join(f"<div class='mono'>{logit:+.3f}  {html.escape(decode(t))}</div>"
                 for t, logit in zip(ids, logits))


def _feature_page(i: int, d_sae: int, table: dict, stats: F.FeatureStats, top: list,
                  sample: list, decode: _Decoder, logits, title: str) -> str:
  """Feature i's page; `table` the per-feature columns of the index, `top` and `sample` its
  contexts (`_Contexts.tokens`)."""
  peak = float(table["max"][i])
  nav = " | ".join(["<a href='index.html'>all features</a>"] +
                   ([f"<a href='feature_{i - 1}.html'>&larr; {i - 1}</a>"] if i > 0 else []) +
                   ([f"<a href='feature_{i + 1}.html'>{i + 1} &rarr;</a>"] if i + 1 < d_sae
                    else []))
  parts = [f"<p>{nav}</p><h1>Feature {i}</h1><p>{html.escape(title)}</p>",
           f"<p>density {table['density'][i]:.4g} ({stats.fire_count[i]} of {stats.tokens} "
           f"tokens) &middot; mean activation when active {table['mean'][i]:.4g} &middot; max "
           f"activation {peak:.4g}</p>",
           "<h2>Activation histogram</h2>", _histogram_svg(stats.hist[i])]
  if logits is not None:
    up_ids, up, down_ids, down = (a[i] for a in logits)
    parts.append("<h2>Logit effect (W_dec[i] &middot; W_U, unit direction)</h2><div class='cols'>"
                 f"<div><h3>promoted</h3>{_logit_html(up_ids, up, decode)}</div>"
                 f"<div><h3>suppressed</h3>{_logit_html(down_ids, down, decode)}</div></div>")
  parts.append("<h2>Top activating contexts</h2><div id='top'>")
  parts += [_context_html(*c, peak, decode, True) for c in top] or ["<p>never active</p>"]
  parts.append("</div>")
  values = np.array([a[c][0] for _, a, c in sample])
  if len(sample):
    parts.append("<h2>Sampled contexts by activation quantile</h2>")
    groups = F.quantile_groups(values)
    for g, (low, high, pick) in enumerate(groups):
      parts.append(f"<h3>quantile range {g + 1} of {len(groups)}: activations {low:.4g} to "
                   f"{high:.4g}</h3>")
      parts += [_context_html(*sample[j], peak, decode, True) for j in pick]
  return _page(f"Feature {i}", "\n".join(parts))


_INDEX_JS = """
const table = document.getElementById('features'), body = table.tBodies[0];
// index.html#search=TEXT&sort=COLUMN (feature, density, mean, max): a link to a view.
const COLUMNS = ['feature', 'density', 'mean', 'max', 'tokens'];
const hash = new URLSearchParams(location.hash.slice(1));
let key = Math.max(0, COLUMNS.indexOf(hash.get('sort'))), desc = key > 0 && key < 4;
document.getElementById('search').value = hash.get('search') || '';
function render() {
  const q = document.getElementById('search').value.toLowerCase();
  const rows = FEATURES.filter(r => !q || String(r[0]) === q || r[4].toLowerCase().includes(q));
  rows.sort((a, b) => (a[key] < b[key] ? -1 : a[key] > b[key] ? 1 : 0) * (desc ? -1 : 1));
  const frag = document.createDocumentFragment();
  for (const r of rows) {
    const tr = document.createElement('tr');
    tr.className = 'feature';
    tr.innerHTML = `<td><a href="feature_${r[0]}.html">${r[0]}</a></td><td>${r[1].toPrecision(3)}`
      + `</td><td>${r[2].toPrecision(3)}</td><td>${r[3].toPrecision(3)}</td><td class="text"></td>`;
    tr.lastChild.textContent = r[4];
    frag.appendChild(tr);
  }
  body.replaceChildren(frag);
  document.getElementById('count').textContent = `${rows.length} of ${FEATURES.length} features`;
}
table.tHead.querySelectorAll('th').forEach((th, j) => th.onclick = () => {
  desc = key === j ? !desc : j > 0 && j < 4; key = j; render();
});
document.getElementById('search').oninput = render;
render();
"""


def _index_page(table: dict, tokens: int, top_tokens: list[str], title: str) -> str:
  rows = [[i, float(d), float(m), float(x), t] for i, (d, m, x, t) in enumerate(
      zip(table["density"], table["mean"], table["max"], top_tokens))]
  data = json.dumps(rows).replace("</", "<\\/")  # never closes the script element early
  body = (f"<h1>SAE features</h1><p>{html.escape(title)}; {tokens} tokens</p>"
          "<p><input id='search' placeholder='feature id or token' size='30'> "
          "<span id='count'></span> (click a column to sort)</p>"
          "<table id='features'><thead><tr><th>feature</th><th>density</th>"
          "<th>mean act. when active</th><th>max act.</th><th class='text'>top tokens</th>"
          "</tr></thead><tbody></tbody></table><noscript>the table needs JavaScript</noscript>")
  return _page("SAE features", body, f"const FEATURES = {data};\n{_INDEX_JS}")


def write_browser(out_dir: str, params: dict, spec: SAESpec, scale: float, shard_folder: str,
                  lm: LanguageModel, tokenizer, *, top_k: int = 20, max_tokens: int | None = None,
                  title: str = "", site: str = "") -> str:
  """Writes the browser of one SAE (params of a single member, `spec` its spec, `scale` the
  normalisation of its training data) over `shard_folder` into `out_dir`; returns the path of
  `index.html`. Logit effects are shown for SAEs on the residual stream or a block's output
  (`site`, e.g. 'blocks.6.resid_post'; '' = any site whose width is the LM's d_model), not on
  'attn_z', whose width can equal d_model but whose directions are not in residual space."""
  shard_set = shards.open_shards(shard_folder, verify=False)  # one pass: no separate check read
  if shard_set.d_model != spec.d_in:
    raise DataError(f"shard folder {shard_folder}: d_model {shard_set.d_model}, but the SAE has "
                    f"d_in {spec.d_in}")
  stats = collect(params, spec, scale, shard_set, top_k, max_tokens)
  w_u = unembedding(lm)
  logits = (F.logit_effects(jnp.asarray(params["W_dec"], jnp.float32), w_u, LOGIT_K)
            if w_u.shape[0] == spec.d_in and not site.endswith("attn_z") else None)
  contexts, decode = _Contexts(shard_set), _Decoder(tokenizer)
  table = {"density": stats.density(), "mean": stats.mean_active(), "max": stats.max_activation()}
  os.makedirs(out_dir, exist_ok=True)
  top_tokens = []
  for i in tqdm(range(spec.d_sae), desc="pages", unit="feature"):
    top = contexts.tokens(stats.top, i)
    with open(os.path.join(out_dir, f"feature_{i}.html"), "w") as f:
      f.write(_feature_page(i, spec.d_sae, table, stats, top, contexts.tokens(stats.sample, i),
                            decode, logits, title))
    centres = [tok[c][0] for tok, _, c in top[:5]]
    top_tokens.append(" \u00b7 ".join(dict.fromkeys(decode(t) for t in centres)))
  index = os.path.join(out_dir, "index.html")
  with open(index, "w") as f:  # last: an index means the pages it links exist
    f.write(_index_page(table, stats.tokens, top_tokens, title))
  return index
