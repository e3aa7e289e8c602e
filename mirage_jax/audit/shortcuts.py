"""Data audit: which words of the instructions predict refuse vs comply, before any model is trained.

The paper found "What" (comply) and "Share" (refuse) by reading a first-word histogram of VLGuard by hand.
This module does it for every token and n-gram (n <= `max_n`) at three positions and ranks them with
statistics a lab can trust. For one gram g at one position, every instruction either contains it there or
not, which gives the 2 x 2 table

                      contains g    does not
    label refuse          a          n_r - a
    label comply          b          n_c - b

(counts of *instructions*, each counted once, so every statistic below refers to the same table).

Positions: `first` — the n-gram that opens the instruction (words 1..n); `first3` — an n-gram inside the
first three words; `any` — anywhere. Words are lowercased runs of letters/digits/apostrophes (punctuation is
dropped); the most frequent original spelling is kept for display and for the attack search.

Statistics (per gram and position):
  log_odds  the log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008,
            "Fightin' Words", eq. 16): with the pooled rate pi = (a + b + 1/2) / (n_r + n_c + 1) and prior
            strength alpha0 (`prior_scale`), alpha = alpha0 pi and beta = alpha0 (1 - pi),
              delta = log[(a + alpha) / (n_r - a + beta)] - log[(b + alpha) / (n_c - b + beta)].
            This is the paper's two-category case (contains g / not): the prior pulls both rates toward the
            pooled rate, so rare grams are shrunk and never infinite. delta > 0: g predicts `refuse`.
            Default alpha0 = (n_r + n_c) / min_count: the rarest gram tested gets a pseudo-count of about one
            instruction in each cell. (With a weak prior, alpha << 1 in an empty cell makes z collapse: a
            perfect separator would rank below a rarer word with one counter-example.)
  z         delta / sqrt(var), var = 1/(a+alpha) + 1/(n_r-a+beta) + 1/(b+alpha) + 1/(n_c-b+beta). Monroe
            et al. keep only the first and third terms (eq. 20), which is right for word counts in large
            corpora (y << n); a presence rate can approach 1 ("What" opens 89 % of the synthetic safe
            instructions, modelled on VLGuard), so all four terms of the delta-method variance are kept.
  p_fisher  two-sided Fisher exact test of the table (scipy's definition: tables at most as probable).
  p_chi2    Pearson chi-square with Yates' continuity correction, 1 d.o.f. (scipy `chi2_contingency`).
  q_value   Benjamini-Hochberg adjusted `p_fisher` over the whole family tested (every gram x position
            with a + b >= `min_count`; the count filter is label-blind, so it keeps the FDR control valid).
  ci_low/ci_high  95 % percentile interval of delta from a stratified parametric bootstrap (`bootstrap`
            replicates): a* ~ Binomial(n_r, (a + 1/2) / (n_r + 1)), b* likewise, i.e. instructions
            resampled within each label. With the raw rates a/n_r this would be exactly the stratified
            nonparametric bootstrap, which returns a zero-width interval whenever a cell is 0; the Jeffreys
            half-count keeps an empty cell variable.
  A gram that never occurs with one label ("Share": 191 refuse, 0 comply) gets a finite delta and a z
  bounded by the prior's pseudo-count in the empty cell (delta's precision really is low there, although
  its sign is certain); its Fisher p / q carry the exact evidence, and `p_refuse` is 0 or 1.

Inputs (`load_instructions`): a JSONL file of {"instruction", "label": "refuse"|"comply"} (or a "response",
labelled by the refusal judge), VLGuard's own `train.json`/`test.json` (label from the `safe` field and the
instruction kind), a built dataset directory (`DIR[:SPLIT]`, label from the records' `label` field or the
refusal judge on `answer`), or `synth[:SPLIT]` (the default synthetic world, generated in memory).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import logging
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from mirage_jax import errors
from mirage_jax.data.records import text as _text
from mirage_jax.eval.safety import STRATIFIED_BOOTSTRAP

log = logging.getLogger("mirage")

_WORD = re.compile(r"[^\W_][\w'\u2019-]*")


class Label(str, enum.Enum):
  REFUSE = "refuse"
  COMPLY = "comply"


class Position(str, enum.Enum):
  FIRST = "first"  # the n-gram that opens the instruction
  FIRST3 = "first3"  # an n-gram inside the first three words
  ANY = "any"  # anywhere


class LabelSource(str, enum.Enum):
  AUTO = "auto"  # the record's label field when it has one, else the refusal judge on the response
  FIELD = "field"
  JUDGE = "judge"


@dataclasses.dataclass(frozen=True)
class AuditConfig:
  """Knobs of the audit (documented in the module docstring)."""

  max_n: int = 3
  positions: tuple[Position, ...] = (Position.FIRST, Position.FIRST3, Position.ANY)
  min_count: int = 5
  prior_scale: float | None = None  # alpha0; None = (n_r + n_c) / min_count
  bootstrap: int = 1000
  seed: int = 0

  def __post_init__(self):
    if self.max_n < 1 or self.min_count < 1 or (self.prior_scale or 1) <= 0 or self.bootstrap < 0:
      raise errors.ConfigError(f"bad AuditConfig {self}: need max_n >= 1, min_count >= 1, prior_scale > 0, "
                               "bootstrap >= 0")
    bad = [p for p in self.positions if p not in {x.value for x in Position}]
    if bad:
      raise errors.ConfigError(f"unknown audit position(s) {bad}; valid: {[x.value for x in Position]}")
    object.__setattr__(self, "positions", tuple(Position(p) for p in self.positions))

  def alpha0(self, n: int) -> float:
    """The prior strength for `n` instructions."""
    return float(self.prior_scale) if self.prior_scale else n / self.min_count


@dataclasses.dataclass(frozen=True)
class Instructions:
  """Instructions with their labels, and where they came from."""

  texts: tuple[str, ...]
  labels: tuple[Label, ...]
  source: str

  def count(self, label: Label) -> int:
    return sum(lab == label for lab in self.labels)


@dataclasses.dataclass(frozen=True)
class ShortcutRow:
  """One gram at one position; `label` is the label it predicts (the sign of `z`)."""

  token: str  # normalised (lowercase) gram, words joined by single spaces
  surface: str  # its most frequent original spelling
  position: str
  n: int
  label: str
  z: float
  log_odds: float
  ci_low: float
  ci_high: float
  p_fisher: float
  p_chi2: float
  q_value: float
  count_refuse: int
  count_comply: int
  p_refuse: float  # a / (a + b): P(refuse | gram at this position)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class AuditResult:
  rows: list[ShortcutRow]  # sorted by |z| descending
  alpha0: float  # the prior strength used
  n_refuse: int
  n_comply: int
  source: str
  config: AuditConfig
  files: dict[str, str] = dataclasses.field(default_factory=dict)

  def top(self, n: int = 10, *, position: Position | None = None, label: Label | None = None,
          max_q: float = 1.0, ngram: int | None = None) -> list[ShortcutRow]:
    """The first `n` rows (by |z|) matching the filters."""
    keep = [r for r in self.rows if (position is None or r.position == Position(position).value)
            and (label is None or r.label == Label(label).value) and r.q_value <= max_q
            and (ngram is None or r.n == ngram)]
    return keep[:n]

  def summary(self) -> dict[str, Any]:
    return {"source": self.source, "n_refuse": self.n_refuse, "n_comply": self.n_comply,
            "tested": len(self.rows), "significant_q05": sum(r.q_value < 0.05 for r in self.rows),
            "alpha0": self.alpha0, "intervals": {"log_odds": STRATIFIED_BOOTSTRAP},
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.config).items()}}


# --------------------------------------------------------------------------- statistics
@dataclasses.dataclass(frozen=True)
class TableStats:
  """Vectorised statistics of many 2 x 2 tables (arrays over grams)."""

  log_odds: np.ndarray
  z: np.ndarray
  p_fisher: np.ndarray
  p_chi2: np.ndarray


def log_odds_dirichlet(a: np.ndarray, b: np.ndarray, n_r: int, n_c: int, prior_scale: float
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(delta, z): Monroe et al.'s log-odds ratio with the informative prior centred on the pooled rate."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  pi = (a + b + 0.5) / (n_r + n_c + 1.0)
  alpha, beta = prior_scale * pi, prior_scale * (1 - pi)
  cells = (a + alpha, n_r - a + beta, b + alpha, n_c - b + beta)
  delta = np.log(cells[0] / cells[1]) - np.log(cells[2] / cells[3])
  var = sum(1.0 / c for c in cells)
  return delta, delta / np.sqrt(var)


def chi2_yates(a: np.ndarray, b: np.ndarray, n_r: int, n_c: int) -> np.ndarray:
  """p-values of Pearson's chi-square with Yates' correction (as scipy.stats.chi2_contingency); 1.0 when a
  margin is zero (the test is undefined: the gram is in every instruction or in none)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n = n_r + n_c
  table = np.stack([a, n_r - a, b, n_c - b])  # [4, G]
  rows = np.array([n_r, n_r, n_c, n_c], np.float64)[:, None]
  cols = np.stack([a + b, n - a - b, a + b, n - a - b])
  expected = rows * cols / n
  ok = np.all(expected > 0, axis=0)
  expected = np.where(ok, expected, 1.0)
  dev = np.maximum(np.abs(table - expected) - 0.5, 0.0)
  stat = np.sum(dev ** 2 / expected, axis=0)
  return np.where(ok, stats.chi2.sf(stat, 1), 1.0)


def fisher_two_sided(a: np.ndarray, b: np.ndarray, n_r: int, n_c: int) -> np.ndarray:
  """Two-sided Fisher exact p-values (scipy.stats.fisher_exact), computed once per distinct table."""
  out = np.empty(len(a), np.float64)
  cache: dict[tuple[int, int], float] = {}
  for i, key in enumerate(zip(np.asarray(a, int).tolist(), np.asarray(b, int).tolist())):
    if key not in cache:
      cache[key] = float(stats.fisher_exact([[key[0], n_r - key[0]], [key[1], n_c - key[1]]])[1])
    out[i] = cache[key]
  return out


def benjamini_hochberg(p: Sequence[float] | np.ndarray) -> np.ndarray:
  """Benjamini-Hochberg adjusted p-values, q_(i) = min_{j >= i} min(1, m p_(j) / j) over the sorted p
  (`scipy.stats.false_discovery_control`, method "bh"); an empty input gives an empty array."""
  p = np.asarray(p, np.float64)
  if p.size == 0:
    return p.copy()
  return np.asarray(stats.false_discovery_control(p, method="bh"), np.float64)


def table_stats(a: np.ndarray, b: np.ndarray, n_r: int, n_c: int, *, prior_scale: float) -> TableStats:
  delta, z = log_odds_dirichlet(a, b, n_r, n_c, prior_scale)
  return TableStats(log_odds=delta, z=z, p_fisher=fisher_two_sided(a, b, n_r, n_c),
                    p_chi2=chi2_yates(a, b, n_r, n_c))


def bootstrap_log_odds_ci(a: np.ndarray, b: np.ndarray, n_r: int, n_c: int, *, prior_scale: float,
                          replicates: int, seed: int, level: float = 0.95, chunk: int = 2048
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Percentile interval of delta under the stratified bootstrap (Jeffreys-smoothed binomial counts)."""
  a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
  if replicates == 0:
    return np.full(a.shape, np.nan), np.full(a.shape, np.nan)
  rng = np.random.default_rng(seed)
  lo, hi = np.empty(a.shape), np.empty(a.shape)
  tails = [50 * (1 - level), 100 - 50 * (1 - level)]
  for s in range(0, a.size, chunk):
    aa, bb = a[s:s + chunk], b[s:s + chunk]
    ra = rng.binomial(n_r, (aa + 0.5) / (n_r + 1.0), size=(replicates, aa.size))
    rb = rng.binomial(n_c, (bb + 0.5) / (n_c + 1.0), size=(replicates, bb.size))
    delta, _ = log_odds_dirichlet(ra, rb, n_r, n_c, prior_scale)
    lo[s:s + chunk], hi[s:s + chunk] = np.percentile(delta, tails, axis=0)
  return lo, hi


# --------------------------------------------------------------------------- grams
def words(text: str) -> list[str]:
  """The words of an instruction in their original spelling (punctuation dropped)."""
  return _WORD.findall(text)


def grams_at(tokens: Sequence[str], position: Position, max_n: int) -> set[tuple[str, ...]]:
  """Every distinct n-gram (n <= max_n) of `tokens` at `position`."""
  if position == Position.FIRST:
    return {tuple(tokens[:n]) for n in range(1, min(max_n, len(tokens)) + 1)}
  span = tokens[:3] if position == Position.FIRST3 else tokens
  return {tuple(span[i:i + n]) for n in range(1, max_n + 1) for i in range(len(span) - n + 1)}


def audit_instructions(data: Instructions, config: AuditConfig = AuditConfig()) -> AuditResult:
  """Count every gram x position per label and compute its statistics; rows sorted by |z| descending."""
  n_r, n_c = data.count(Label.REFUSE), data.count(Label.COMPLY)
  if not n_r or not n_c:
    raise errors.DataError(f"{data.source}: the audit needs both labels, got {n_r} refuse and {n_c} comply")
  alpha0 = config.alpha0(n_r + n_c)
  counts: dict[tuple[Position, tuple[str, ...]], list[int]] = collections.defaultdict(lambda: [0, 0])
  spellings: dict[tuple[str, ...], collections.Counter] = collections.defaultdict(collections.Counter)
  for text, label in zip(data.texts, data.labels, strict=True):
    original = words(text)
    lower = [w.lower() for w in original]
    col = 0 if label == Label.REFUSE else 1
    for position in config.positions:
      for gram in grams_at(lower, position, config.max_n):
        counts[position, gram][col] += 1
    for n in range(1, min(config.max_n, len(original)) + 1):  # spellings of the opening grams
      spellings[tuple(lower[:n])][" ".join(original[:n])] += 1
  keys = [k for k, (a, b) in counts.items() if a + b >= config.min_count]
  if not keys:
    return AuditResult(rows=[], alpha0=alpha0, n_refuse=n_r, n_comply=n_c, source=data.source, config=config)
  a = np.array([counts[k][0] for k in keys])
  b = np.array([counts[k][1] for k in keys])
  st = table_stats(a, b, n_r, n_c, prior_scale=alpha0)
  q = benjamini_hochberg(st.p_fisher)
  lo, hi = bootstrap_log_odds_ci(a, b, n_r, n_c, prior_scale=alpha0, replicates=config.bootstrap, seed=config.seed)
  rows = []
  for i, (position, gram) in enumerate(keys):
    spelled = spellings.get(gram)
    rows.append(ShortcutRow(
        token=" ".join(gram), surface=spelled.most_common(1)[0][0] if spelled else " ".join(gram),
        position=position.value, n=len(gram), label=(Label.REFUSE if st.z[i] > 0 else Label.COMPLY).value,
        z=float(st.z[i]), log_odds=float(st.log_odds[i]), ci_low=float(lo[i]), ci_high=float(hi[i]),
        p_fisher=float(st.p_fisher[i]), p_chi2=float(st.p_chi2[i]), q_value=float(q[i]),
        count_refuse=int(a[i]), count_comply=int(b[i]), p_refuse=float(a[i] / (a[i] + b[i]))))
  rows.sort(key=lambda r: (-abs(r.z), r.position, r.token))
  return AuditResult(rows=rows, alpha0=alpha0, n_refuse=n_r, n_comply=n_c, source=data.source, config=config)


# --------------------------------------------------------------------------- inputs
def _label(value: Any, where: str) -> Label:
  try:
    return Label(_text(value).strip().lower())
  except ValueError:
    raise errors.DataError(f"{where}: label must be 'refuse' or 'comply', got {value!r}") from None


def _judge_label(response: str, judge) -> Label:
  return Label.REFUSE if judge.is_refusal(response) else Label.COMPLY


def _refusal_judge(preset: str):
  from mirage_jax.eval.judges import RefusalJudge
  return RefusalJudge(preset)


def from_records(records: Iterable[Mapping[str, Any]], *, source: str, label_source: LabelSource = LabelSource.AUTO,
                 refusal_preset: str = "mirage") -> Instructions:
  """Dataset records (`question`, `label`, `answer`) -> Instructions."""
  judge = _refusal_judge(refusal_preset) if label_source != LabelSource.FIELD else None
  texts, labels = [], []
  for i, rec in enumerate(records):
    texts.append(_text(rec["question"]))
    if label_source == LabelSource.JUDGE or (label_source == LabelSource.AUTO and "label" not in rec):
      labels.append(_judge_label(_text(rec["answer"]), judge))
    else:
      labels.append(_label(rec["label"], f"{source} record {i}"))
  return Instructions(tuple(texts), tuple(labels), source)


def read_jsonl(path: pathlib.Path, *, label_source: LabelSource = LabelSource.AUTO,
               refusal_preset: str = "mirage") -> Instructions:
  """JSONL rows {"instruction" (or "question"), "label"} or {"instruction", "response"} (judged)."""
  judge = None
  texts, labels = [], []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise errors.DataError(f"{where}: not JSON ({e.msg})") from None
    text = row.get("instruction", row.get("question"))
    if not isinstance(text, str):
      raise errors.DataError(f"{where}: needs a string 'instruction' (or 'question')")
    use_judge = label_source == LabelSource.JUDGE or (label_source == LabelSource.AUTO and "label" not in row)
    if use_judge:
      if "response" not in row:
        raise errors.DataError(f"{where}: needs a 'label' ('refuse'|'comply') or a 'response' to judge")
      judge = judge or _refusal_judge(refusal_preset)
      labels.append(_judge_label(row["response"], judge))
    else:
      labels.append(_label(row.get("label"), where))
    texts.append(text)
  return Instructions(tuple(texts), tuple(labels), str(path))


def read_vlguard_json(path: pathlib.Path) -> Instructions:
  """VLGuard's `train.json` / `test.json`: every instr-resp turn; `safe_instruction` on a safe image is
  comply, `unsafe_instruction` and any instruction on an unsafe image (`safe` = false) are refuse."""
  data = json.loads(path.read_text())
  if not isinstance(data, list) or (data and "instr-resp" not in data[0]):
    raise errors.DataError(f"{path}: not VLGuard JSON (a list of records with 'instr-resp')")
  texts, labels = [], []
  for rec in data:
    for turn in rec["instr-resp"]:
      if "safe_instruction" in turn and rec.get("safe", False):
        texts.append(turn["safe_instruction"])
        labels.append(Label.COMPLY)
      else:
        texts.append(turn.get("unsafe_instruction", turn.get("instruction", "")))
        labels.append(Label.REFUSE)
  return Instructions(tuple(texts), tuple(labels), str(path))


def load_instructions(data_spec: str, *, label_source: LabelSource = LabelSource.AUTO,
                      refusal_preset: str = "mirage") -> Instructions:
  """Resolve a data spec: `FILE.jsonl`, VLGuard `FILE.json`, `DIR[:SPLIT]` (built dataset; default split
  `sft`, else `train`) or `synth[:SPLIT]` (default synthetic world, in memory; default split `sft`)."""
  path = pathlib.Path(data_spec)
  if path.is_file():
    if path.suffix == ".jsonl":
      return read_jsonl(path, label_source=label_source, refusal_preset=refusal_preset)
    if path.suffix == ".json":
      return read_vlguard_json(path)
    raise errors.DataError(f"{path}: expected a .jsonl (instruction/label rows) or VLGuard .json file")
  if path.suffix in (".jsonl", ".json"):
    raise errors.MissingFileError(f"{path}: no such file")
  base, _, split = (data_spec, "", "") if path.exists() else data_spec.rpartition(":")
  if not base:
    base, split = data_spec, ""
  if base == "synth":
    from mirage_jax.data import synthetic
    split = split or "sft"
    records = synthetic.World(synthetic.WorldConfig()).split(split)
    return from_records(records, source=f"synth:{split}", label_source=label_source,
                        refusal_preset=refusal_preset)
  from mirage_jax.data import tfds_builders
  dataset = tfds_builders.open_dataset(base)  # FileNotFoundError with a clear message
  available = dataset.splits()
  split = split or next((s for s in ("sft", "train") if s in available), "")
  if not split:
    raise errors.UsageError(f"{base}: give a split as DIR:SPLIT; available: {sorted(available)}")
  source = dataset.source(split)
  fields = ("question", "label", "answer")
  records = ({k: source[i][k] for k in fields} for i in range(len(source)))
  return from_records(records, source=f"{base}:{split}", label_source=label_source, refusal_preset=refusal_preset)


# --------------------------------------------------------------------------- outputs
def candidate_words(result: AuditResult, label: Label, *, top: int = 10, max_q: float = 0.05,
                    max_n: int = 1) -> list[str]:
  """Spellings of the openings (first n-grams, n <= max_n) that predict `label` (q <= max_q), strongest
  first: the audit's contribution to the attack's `auto` vocabulary."""
  out: list[str] = []
  for row in result.rows:
    if (row.n <= max_n and row.position == Position.FIRST.value and row.label == Label(label).value
        and row.q_value <= max_q and row.surface not in out):
      out.append(row.surface)
  return out[:top]


def format_table(rows: Sequence[ShortcutRow]) -> str:
  lines = ["| # | gram | position | predicts | z | log-odds [95% CI] | refuse | comply | P(refuse) | q |",
           "|---:|---|---|---|---:|---|---:|---:|---:|---:|"]
  for i, r in enumerate(rows, 1):
    lines.append(f"| {i} | {r.surface if r.position == 'first' else r.token} | {r.position} | {r.label} | "
                 f"{r.z:+.1f} | {r.log_odds:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}] | {r.count_refuse} | "
                 f"{r.count_comply} | {r.p_refuse:.3f} | {r.q_value:.1e} |")
  return "\n".join(lines)


def markdown(result: AuditResult, *, top: int = 25, plot: str | None = None) -> str:
  s = result.summary()
  parts = [
      "# Shortcut audit", "",
      f"Data: `{result.source}` — {result.n_refuse} refuse and {result.n_comply} comply instructions. "
      f"{s['tested']} gram x position pairs with at least {result.config.min_count} occurrences were tested; "
      f"{s['significant_q05']} have a Benjamini-Hochberg q < 0.05 (Fisher exact). z: log-odds ratio with an "
      f"informative Dirichlet prior (Monroe et al. 2008, prior strength {result.alpha0:.0f}) over its "
      f"standard error; z > 0 predicts refuse. Intervals: {result.config.bootstrap}-replicate stratified "
      "bootstrap.", "",
      f"## Top {top} by |z|", "", format_table(result.rows[:top]), "",
      "## First words", "", format_table(result.top(top, position=Position.FIRST, ngram=1)), ""]
  if plot:
    parts += [f"![shortcuts]({plot})", ""]
  return "\n".join(parts)


def plot(result: AuditResult, path: pathlib.Path, *, top: int = 15) -> None:
  """Left: log-odds (95% CI) of the strongest first words. Right: z against frequency for every gram
  (the "Fightin' Words" plot), the strongest labelled."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colour = {Label.REFUSE.value: "#d9534f", Label.COMPLY.value: "#337ab7"}
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
  first = result.top(top, position=Position.FIRST, ngram=1)[::-1]
  y = np.arange(len(first))
  left.barh(y, [r.log_odds for r in first], color=[colour[r.label] for r in first],
            # clipped at 0: a percentile interval need not contain the estimate
            xerr=np.maximum(0, [[r.log_odds - r.ci_low for r in first], [r.ci_high - r.log_odds for r in first]]),
            error_kw=dict(lw=0.8, capsize=2))
  left.set_yticks(y, [f"{r.surface}  (z={r.z:+.0f})" for r in first], fontsize=8)
  left.axvline(0, color="k", lw=0.6)
  left.set_xlabel("log-odds ratio refuse vs comply (95% CI)")
  left.set_title("first word", fontsize=10)
  rows = result.rows
  total = np.array([r.count_refuse + r.count_comply for r in rows])
  right.scatter(np.log10(total), [r.z for r in rows], s=6, alpha=0.5, c=[colour[r.label] for r in rows])
  labelled: set[str] = set()
  for r in rows:  # the 8 strongest distinct grams (one gram is often strongest at several positions)
    if r.token not in labelled and len(labelled) < 8:
      labelled.add(r.token)
      right.annotate(f"{r.token} ({r.position})", (np.log10(r.count_refuse + r.count_comply), r.z), fontsize=7)
  for level in (-1.96, 1.96):
    right.axhline(level, color="grey", lw=0.5, ls="--")
  right.set_xlabel("log10 instructions containing the gram")
  right.set_ylabel("z (> 0: predicts refuse)")
  right.set_title("every gram x position", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(result: AuditResult, out_dir: str | pathlib.Path) -> dict[str, str]:
  """`shortcuts.json` (rows by |z| desc), `shortcuts.md`, `shortcuts.png` and `summary.json` in `out_dir`."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files = {name: str(out / name) for name in ("shortcuts.json", "shortcuts.md", "shortcuts.png", "summary.json")}
  pathlib.Path(files["shortcuts.json"]).write_text(json.dumps([r.to_dict() for r in result.rows], indent=0))
  pathlib.Path(files["summary.json"]).write_text(json.dumps(result.summary(), indent=1))
  if result.rows:
    plot(result, pathlib.Path(files["shortcuts.png"]))
  else:
    files.pop("shortcuts.png")
  pathlib.Path(files["shortcuts.md"]).write_text(markdown(result, plot="shortcuts.png" if result.rows else None))
  result.files = files
  return files


def run_audit(data_spec: str, *, out_dir: str | pathlib.Path | None = None, config: AuditConfig = AuditConfig(),
              label_source: str = "auto", refusal_preset: str = "mirage") -> AuditResult:
  """`mirage audit`: load `data_spec` (see `load_instructions`), audit it, and write the files to `out_dir`."""
  data = load_instructions(data_spec, label_source=LabelSource(label_source), refusal_preset=refusal_preset)
  result = audit_instructions(data, config)
  log.info("audit of %s: %d refuse / %d comply, %d rows", data.source, result.n_refuse, result.n_comply,
           len(result.rows))
  if out_dir is not None:
    write(result, out_dir)
  return result
