"""The convert destination rules: each refusal comes before the source is read (here: a source that does not
exist), and what they accept is the tensor type to write (a .gguf name) or None (a folder)."""

import pytest

from lmforge.checkpoint.convert import convert, gguf_outtype


def test_a_destination_is_refused_before_the_source_is_read(tmp_path):
    (tmp_path / "a_file").write_text("data")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    missing = tmp_path / "no-such-model"
    for dst, options, message in [
        (tmp_path / "out", {"outtype": "q8_0"}, "--outtype q8_0 is for a .gguf destination"),
        (tmp_path / "m.gguf", {"dtype": "float16"}, "--dtype is for a folder destination"),
        (tmp_path / "a_file", {}, "exists and is a file"),
        (tmp_path / "notes", {}, "exists and is not a model folder"),
        (tmp_path / "m.gguf", {"outtype": "q4"}, "--outtype 'q4' is not one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            convert(missing, dst, **options)
    assert (tmp_path / "a_file").read_text() == "data" and (tmp_path / "notes" / "notes.txt").read_text() == "mine"


def test_what_a_destination_accepts(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert gguf_outtype(tmp_path / "M.GGUF") == "f16"
    assert gguf_outtype(tmp_path / "m.gguf", outtype="q8_0") == "q8_0"
    assert gguf_outtype(tmp_path / "new", dtype="bfloat16") is None
    assert gguf_outtype(tmp_path / "model") is None  # a model folder is replaced, as lmforge.save does
    assert gguf_outtype(tmp_path / "empty") is None
