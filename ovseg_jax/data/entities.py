"""Entities of a caption: the paper's 100-word entity set, the 73 canonical entities, masking and prompts.

Paper Sec. 3.1.2 / appendix A.1: a caption is kept when it names one of 100 frequent entities; the masked
caption g(T) replaces every entity word by [MASK]; the prompted entity sentence h(E) fills the entities into a
CLIP ImageNet template ("a bad photo of a dog and people"). The authors' code (docs/paper_vs_authors.md Q23) has
two entity matchers with quirks; both are reproduced here behind `mode='official'`:

  * filtering: `nltk.word_tokenize` + case-sensitive exact token match ("dogs", "Dog" and "dog," never match);
  * masking: `caption.split(' ')`, each word `.strip("'s")` (strips any leading/trailing ' or s, so
    "bus" -> "bu", "this" -> "thi"), '.' removed, lemmatised, synonym-mapped, tested against the 73.

`mode='fixed'` (default for new runs) tokenizes with spans (nltk RegexpTokenizer), lower-cases, drops
possessives ('s, s'), singularises plurals by rule (irregulars men/women/children/mice/geese/knives/...),
maps synonyms to the canonical 73 and masks the exact character span of each entity word, keeping the
rest of the caption untouched. WordNet lemmatisation can replace the rules when NLTK's wordnet data exists.

Everything is parameterised by a `Vocabulary`, so the synthetic dataset uses its six shape names.
"""

import dataclasses
import functools
import re

import nltk
from nltk.tokenize import NLTKWordTokenizer, RegexpTokenizer

from ovseg_jax import cli
from ovseg_jax import prompts

MASK_TOKEN = '[MASK]'

# Appendix A.1 / `TOP_CLASSES_1`: 100 surface words, case as in the paper ("TV" and "tv" both listed).
CC4M_SURFACE = (
    'people', 'man', 'men', 'woman', 'women', 'girl', 'boy', 'lady', 'kid', 'child', 'children', 'baby',
    'student', 'bride', 'groom', 'couple', 'prince', 'princess', 'car', 'bus', 'truck', 'motorcycle',
    'train', 'bicycle', 'boat', 'aeroplane', 'airplane', 'motorbike', 'bike', 'cup', 'bottle', 'bowl',
    'knife', 'spoon', 'glass', 'fork', 'chair', 'table', 'bench', 'clock', 'laptop', 'light', 'vase',
    'plant', 'remote', 'microwave', 'toaster', 'oven', 'mouse', 'keyboard', 'sofa', 'monitor', 'desk',
    'tv', 'TV', 'couch', 'flower', 'refrigerator', 'house', 'building', 'hotel', 'handbag', 'umbrella',
    'book', 'backpack', 'phone', 'shirt', 'tie', 'suitcase', 'T-shirt', 'bag', 'box', 'sink', 'bed',
    'toilet', 'cat', 'dog', 'horse', 'bird', 'cow', 'sheep', 'elephant', 'bear', 'zebra', 'giraffe',
    'ball', 'racket', 'skateboard', 'skis', 'snowboard', 'surfboard', 'kite', 'pizza', 'cake', 'apple',
    'banana', 'sandwich', 'orange', 'carrot', 'donut',
)

_PEOPLE = ('man', 'men', 'woman', 'women', 'girl', 'boy', 'lady', 'kid', 'child', 'children', 'baby',
           'student', 'bride', 'groom', 'couple', 'prince', 'princess')
# The official `syn_dict` (keys are lemmas, so "men"/"children" reach it as "man"/"child" through WordNet;
# the plural keys are listed too so that the surface -> canonical map is total).
CC4M_SYNONYMS = {
    **{w: 'people' for w in _PEOPLE},
    'airplane': 'aeroplane', 'motorbike': 'motorcycle', 'bike': 'bicycle', 'TV': 'tv', 'desk': 'table',
    'couch': 'sofa', 'building': 'house', 'hotel': 'house', 'T-shirt': 'shirt', 'handbag': 'bag',
}
# Fixed mode only: spellings the paper's list misses (singular of "skis", the other spelling of "donut").
CC4M_EXTRA_FORMS = {'ski': 'skis', 'doughnut': 'donut', 'tshirt': 'T-shirt'}

SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'ring')

# The answer uses the text before '{}' of one of CLIP's 80 ImageNet prompt templates.
TEMPLATE_PREFIXES = tuple(t.split('{}')[0] for t in prompts.IMAGENET_TEMPLATES)
CROSS_PROMPT = 'A photo of {}'

# Irregular plurals -> singular (checked before the suffix rules).
_IRREGULAR = {
    'men': 'man', 'women': 'woman', 'children': 'child', 'people': 'person', 'mice': 'mouse',
    'geese': 'goose',
    'knives': 'knife', 'wives': 'wife', 'lives': 'life', 'leaves': 'leaf', 'teeth': 'tooth', 'feet': 'foot',
    'oxen': 'ox', 'dice': 'die', 'loaves': 'loaf', 'halves': 'half', 'wolves': 'wolf', 'calves': 'calf',
    'shelves': 'shelf', 'thieves': 'thief', 'selves': 'self', 'lice': 'louse', 'cacti': 'cactus',
    'fungi': 'fungus', 'sheep': 'sheep', 'fish': 'fish', 'deer': 'deer', 'series': 'series',
    'species': 'species', 'aircraft': 'aircraft', 'fezzes': 'fez', 'quizzes': 'quiz',
}
# Words ending in s that are singular (never strip their s).
_SINGULAR_S = frozenset(('bus', 'glass', 'princess', 'dress', 'grass', 'class', 'bus', 'gas', 'lens',
                         'canvas', 'cactus', 'chess', 'news', 'series', 'species', 'skis', 'its', 'this',
                         'is', 'was', 'has', 'his', 'us', 'yes', 'plus', 'across', 'less', 'business'))

_WORD_RE = r"[A-Za-z0-9]+(?:[-'\u2019][A-Za-z0-9]+)*(?:'|\u2019)?"


@dataclasses.dataclass(frozen=True, eq=False)
class Vocabulary:
  """An entity vocabulary: surface words, their canonical entity, and extra fixed-mode spellings.

  surface: entity words as listed (case kept: the official filter is case-sensitive).
  synonyms: surface word -> canonical entity (words not listed are their own canonical entity).
  extra_forms: fixed-mode only, more spellings -> a surface word.
  """
  name: str
  surface: tuple
  synonyms: dict = dataclasses.field(default_factory=dict)
  extra_forms: dict = dataclasses.field(default_factory=dict)

  def _key(self):
    return (self.name, self.surface, tuple(sorted(self.synonyms.items())),
            tuple(sorted(self.extra_forms.items())))

  def __eq__(self, other):
    return isinstance(other, Vocabulary) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  @property
  def canonical(self) -> tuple:
    """The canonical entities in first-listed order (73 for CC4M, 6 for the synthetic shapes)."""
    out = []
    for w in self.surface:
      c = self.synonyms.get(w, w)
      if c not in out:
        out.append(c)
    return tuple(out)

  def canonical_of(self, surface_word: str) -> str:
    return self.synonyms.get(surface_word, surface_word)

  def to_json(self) -> dict:
    return {'name': self.name, 'surface': list(self.surface), 'synonyms': dict(self.synonyms),
            'extra_forms': dict(self.extra_forms)}

  @classmethod
  def from_json(cls, d: dict) -> 'Vocabulary':
    return cls(d['name'], tuple(d['surface']), dict(d.get('synonyms', {})), dict(d.get('extra_forms', {})))


CC4M = Vocabulary('cc4m', CC4M_SURFACE, CC4M_SYNONYMS, CC4M_EXTRA_FORMS)
SYNTHETIC = Vocabulary('synthetic', SHAPES)
VOCABULARIES = {'cc4m': CC4M, 'synthetic': SYNTHETIC}


def get_vocabulary(name_or_vocab) -> Vocabulary:
  if isinstance(name_or_vocab, Vocabulary):
    return name_or_vocab
  if name_or_vocab not in VOCABULARIES:
    raise ValueError(f'unknown entity vocabulary {name_or_vocab!r}; expected one of {sorted(VOCABULARIES)}')
  return VOCABULARIES[name_or_vocab]


def dataset_vocabulary(dataset: str) -> str:
  """The entity vocabulary a tfds dataset is built with when its metadata names none."""
  return 'synthetic' if dataset == 'synthetic_captions' else 'cc4m'


def singular_candidates(word: str) -> list:
  """Rule-based singular forms of a lower-case word, most likely first (the word itself included)."""
  out = [word]
  if word in _IRREGULAR:
    out.append(_IRREGULAR[word])
    return out
  if word in _SINGULAR_S or len(word) <= 2:
    return out
  if word.endswith('ies') and len(word) > 4:
    out.append(word[:-3] + 'y')          # ladies -> lady, babies -> baby
  if word.endswith('ves'):
    out += [word[:-3] + 'f', word[:-3] + 'fe']   # scarves -> scarf, knives -> knife
  if word.endswith(('sses', 'shes', 'ches', 'xes', 'zes', 'oes', 'uses')):
    out.append(word[:-2])                # glasses, dishes, benches, boxes, tomatoes, buses
  if word.endswith('s') and not word.endswith(('ss', 'us', 'is')):
    out.append(word[:-1])                # dogs -> dog, horses -> horse, ties -> tie
  return out


@functools.lru_cache(maxsize=1)
def _wordnet_lemmatizer():
  try:
    nltk.data.find('corpora/wordnet')
  except LookupError:
    raise RuntimeError(
        "lemmatizer='wordnet' needs NLTK's wordnet corpus, which is not installed: follow docs/data.md "
        "'NLTK WordNet without a download' (apt-get install wordnet-base wordnet-sense-index, copy their "
        "files into $NLTK_DATA/corpora/wordnet/ with a lexnames file) or use lemmatizer='rules'") from None
  from nltk.stem import WordNetLemmatizer  # pylint: disable=g-import-not-at-top
  lem = WordNetLemmatizer()
  lem.lemmatize('dogs')  # loads the corpus now so a broken install fails here, not mid-run
  return lem


def _has_punkt() -> bool:
  for res in ('tokenizers/punkt_tab/english/', 'tokenizers/punkt'):
    try:
      nltk.data.find(res)
      return True
    except LookupError:
      pass
  return False


@dataclasses.dataclass(frozen=True)
class Match:
  """One entity mention: caption[start:end] is the word to mask; `word` is the vocabulary surface word."""
  start: int
  end: int
  text: str
  word: str
  canonical: str


class EntityExtractor:
  """Caption -> entities, masked caption and prompts for one vocabulary.

  mode: 'fixed' (case, plurals, punctuation, possessives, synonyms handled) | 'official' (authors' quirks).
  lemmatizer: 'rules' (offline suffix rules + irregular plurals) | 'wordnet' (NLTK WordNet, needs its data).
    In official mode 'wordnet' reproduces the authors' masking exactly; 'rules' matches it on the plural
    nouns of the entity set.

  Example:
    ex = EntityExtractor()                      # CC4M, fixed
    ex.entities("Two dogs and a man's T-shirts.")   -> ['dog', 'man', 'T-shirt']   (surface words)
    ex.canonical("Two dogs and a man's T-shirts.")  -> ['dog', 'people', 'shirt']
    ex.mask("Two dogs and a man's T-shirts.")
      -> ("Two [MASK] and a [MASK]'s [MASK].", ['dog', 'people', 'shirt'])
  """

  def __init__(self, vocab='cc4m', mode: str = 'fixed', lemmatizer: str = 'rules'):
    if mode not in ('fixed', 'official'):
      raise ValueError(f"entity mode {mode!r}: expected 'fixed' or 'official'")
    if lemmatizer not in ('rules', 'wordnet'):
      raise ValueError(f"lemmatizer {lemmatizer!r}: expected 'rules' or 'wordnet'")
    self.vocab = get_vocabulary(vocab)
    self.mode = mode
    self.lemmatizer = lemmatizer
    self._wordnet = _wordnet_lemmatizer() if lemmatizer == 'wordnet' else None
    self._surface = frozenset(self.vocab.surface)
    self._canonical = frozenset(self.vocab.canonical)
    # Fixed mode: lower-cased form -> surface word ("tv" and "TV" -> first listed, i.e. "tv").
    lower = {}
    for w in self.vocab.surface:
      lower.setdefault(w.lower(), w)
    for form, w in self.vocab.extra_forms.items():
      lower.setdefault(form.lower(), w)
    self._lower = lower
    self._syn_lower = {k.lower(): v for k, v in self.vocab.synonyms.items()}
    self._regexp = RegexpTokenizer(_WORD_RE)
    self._treebank = NLTKWordTokenizer()
    self._punkt = _has_punkt() if mode == 'official' else False

  # ------------------------------------------------------------------ fixed mode
  def _lookup(self, token: str):
    """Vocabulary surface word for a token (fixed mode), or None."""
    word = token.lower().replace('\u2019', "'")
    for suffix in ("'s", "'"):
      if word.endswith(suffix) and len(word) > len(suffix):
        word = word[:-len(suffix)]
        break
    if self._wordnet is not None:
      cands = [word, self._wordnet.lemmatize(word)]
    else:
      cands = singular_candidates(word)
    for c in cands:
      if c in self._lower:
        return self._lower[c]
    return None

  def find(self, caption: str) -> list:
    """Every entity mention of `caption` (fixed mode) as `Match`es, in caption order."""
    out = []
    for start, end in self._regexp.span_tokenize(caption):
      text = caption[start:end]
      word = self._lookup(text)
      if word is None:
        continue
      # mask the noun itself, not a trailing possessive
      m = re.search(r"(?:'s|\u2019s|'|\u2019)$", text)
      if m and m.start() > 0:
        end = start + m.start()
      out.append(Match(start, end, caption[start:end], word, self.vocab.canonical_of(word)))
    return out

  # ------------------------------------------------------------------ official mode
  def official_tokens(self, caption: str) -> list:
    """`nltk.word_tokenize` when punkt data exists; else the same Treebank tokenizer per regex sentence."""
    if self._punkt:
      return nltk.word_tokenize(caption)
    sentences = re.split(r'(?<=[.!?])\s+', caption.strip())
    return [t for s in sentences if s for t in self._treebank.tokenize(s)]

  def _official_judge(self, word: str):
    """`judge_noun`: '.' removed, lower-cased lemma, synonym map, membership in the canonical set."""
    word = word.replace('.', '')
    low = word.lower()
    if self._wordnet is not None:
      lemma = self._wordnet.lemmatize(low)
    else:
      lemma = next((c for c in singular_candidates(low)
                    if self.vocab.synonyms.get(c, c) in self._canonical), low)
    # the official syn_dict is keyed by the listed spelling ('TV', 'T-shirt') but looked up with lower-case
    # lemmas, so 't-shirt' never reaches 'shirt'
    lemma = self.vocab.synonyms.get(lemma, lemma)
    return lemma if lemma in self._canonical else None

  # ------------------------------------------------------------------ public API
  def entities(self, caption: str) -> list:
    """Surface entity words of a caption (unique). Non-empty means the caption is kept for CC4M.

    official: case-sensitive exact token match, sorted (the authors used an unordered set).
    fixed: vocabulary surface words in order of first mention ("Dogs" -> 'dog', "men" -> 'men').
    """
    if self.mode == 'official':
      return sorted({t for t in self.official_tokens(caption) if t in self._surface})
    out = []
    for m in self.find(caption):
      if m.word not in out:
        out.append(m.word)
    return out

  def canonical(self, caption: str) -> list:
    """Canonical entities (the 73 for CC4M) of the caption's surface entities, unique, in order."""
    out = []
    for w in self.entities(caption):
      c = self.vocab.canonical_of(w)
      if c not in out:
        out.append(c)
    return out

  def mask(self, caption: str) -> tuple:
    """Masked caption g(T) and the canonical entities it masked (unique, in order).

    fixed: every entity mention's characters -> '[MASK]', the rest of the caption unchanged.
    official: words of `caption.split(' ')` after `.strip("'s").strip(' ').strip('\\n')`; entity words ->
      '[MASK]', other words kept in their stripped form (the authors' mutilation, e.g. "bus" -> "bu").
    """
    if self.mode == 'official':
      words, ents = [], []
      for word in caption.split(' '):
        word = word.strip("'s").strip(' ').strip('\n')
        lemma = self._official_judge(word)
        if lemma is None:
          words.append(word)
        else:
          words.append(MASK_TOKEN)
          if lemma not in ents:
            ents.append(lemma)
      return ' '.join(words), ents
    matches = self.find(caption)
    pieces, pos, ents = [], 0, []
    for m in matches:
      pieces += [caption[pos:m.start], MASK_TOKEN]
      pos = m.end
      if m.canonical not in ents:
        ents.append(m.canonical)
    pieces.append(caption[pos:])
    return ''.join(pieces), ents

  @staticmethod
  def answer(entities, template_index: int) -> str:
    """Prompted entity sentence h(E): template prefix + ' and '.join(entities) ("a bad photo of a dog and
    cat")

    template_index picks one of the 80 CLIP ImageNet templates (the caller draws it from its own rng). With no
    entity the answer is the bare prefix, as in the official code.
    """
    return TEMPLATE_PREFIXES[template_index % len(TEMPLATE_PREFIXES)] + ' and '.join(entities)

  @staticmethod
  def cross_prompt(entity: str) -> str:
    """Prompt for the entity shared with the cross-image partner: 'A photo of {entity}'."""
    return CROSS_PROMPT.format(entity)


@functools.lru_cache(maxsize=16)
def get_extractor(vocab='cc4m', mode: str = 'fixed', lemmatizer: str = 'rules') -> EntityExtractor:
  """Cached `EntityExtractor` (vocab given by name or as a hashable `Vocabulary`)."""
  return EntityExtractor(vocab, mode, lemmatizer)


def compare_modes(captions, vocab='cc4m') -> dict:
  """How often 'official' and 'fixed' disagree on a caption sample (the README's comparison).

  Counts: kept by each mode's filter, filter disagreements, and captions whose masked canonical entity sets
  differ. `examples` holds up to 5 captions of each disagreement kind.
  """
  off, fix = get_extractor(vocab, 'official'), get_extractor(vocab, 'fixed')
  out = {'captions': 0, 'kept_official': 0, 'kept_fixed': 0, 'kept_only_fixed': 0, 'kept_only_official': 0,
         'masked_entities_differ': 0, 'examples': {'kept_only_fixed': [], 'masked_entities_differ': []}}
  for cap in captions:
    out['captions'] += 1
    k_off, k_fix = bool(off.entities(cap)), bool(fix.entities(cap))
    out['kept_official'] += k_off
    out['kept_fixed'] += k_fix
    out['kept_only_fixed'] += k_fix and not k_off
    out['kept_only_official'] += k_off and not k_fix
    if k_fix and not k_off and len(out['examples']['kept_only_fixed']) < 5:
      out['examples']['kept_only_fixed'].append(cap)
    if set(off.mask(cap)[1]) != set(fix.mask(cap)[1]):
      out['masked_entities_differ'] += 1
      if len(out['examples']['masked_entities_differ']) < 5:
        out['examples']['masked_entities_differ'].append(cap)
  return out


@cli.entry_point
def main(argv=None) -> int:
  """`python -m ovseg_jax.data.entities --captions FILE`: compare the two modes on one caption per line
  (a TSV/CSV line contributes its last column)."""
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  flags.DEFINE_string('captions', None, 'caption file, one caption per line (TSV/CSV: the last column)',
                      flag_values=fv)
  flags.DEFINE_integer('limit', 0, 'read at most this many lines (0: all)', flag_values=fv)
  a = cli.parse(fv, argv, prog='python -m ovseg_jax.data.entities', doc=main.__doc__, required=('captions',))
  try:
    with open(a.captions, encoding='utf-8', errors='replace') as f:
      caps = []
      for line in f:
        caps.append(line.rstrip('\n').split('\t')[-1])
        if a.limit and len(caps) >= a.limit:
          break
  except OSError as e:
    print(f'error: --captions {a.captions}: {e.strerror}', file=sys.stderr)
    return 2
  print(json.dumps(compare_modes(caps), indent=1))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
