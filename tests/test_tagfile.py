import pytest

from codsr.tagging.tagfile import read_tag_table


def test_tsv_and_json(tmp_path):
    tsv = tmp_path / "tags.tsv"
    tsv.write_text("# comment\na.png\tcat, fur\n\nsub/b.png\t  dog  \n", encoding="utf-8")
    assert read_tag_table(tsv) == {"a.png": "cat, fur", "sub/b.png": "dog"}
    js = tmp_path / "tags.json"
    js.write_text('{"a.png": "cat"}', encoding="utf-8")
    assert read_tag_table(js) == {"a.png": "cat"}


def test_errors_name_the_option_and_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a.png\tcat\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--captions .*line 2"):
        read_tag_table(bad, "--captions")
    js = tmp_path / "bad.json"
    js.write_text('["a", "b"]', encoding="utf-8")
    with pytest.raises(ValueError, match="prompts.file"):
        read_tag_table(js, "prompts.file")
    with pytest.raises(FileNotFoundError, match="codsr tag"):
        read_tag_table(tmp_path / "missing.tsv")
