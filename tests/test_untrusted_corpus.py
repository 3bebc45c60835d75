"""Issue 24, every failure one line: corpora with lone surrogates, raw line separators inside a JSON
string, and links to nothing."""
import json

import pytest

from rnnscope.errors import RnnscopeError
from rnnscope.probe import read_documents


def test_a_raw_line_separator_inside_a_json_string_is_part_of_the_text(tmp_path):
    texts = ["a\u2028b", "c\u0085d\x1ce", "f\u2029g"]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "name": f"d{i}"}, ensure_ascii=False)
                              for i, t in enumerate(texts)) + "\r\n", encoding="utf-8")
    docs = read_documents(path)
    assert docs.texts == texts and docs.names == ["d0", "d1", "d2"]


@pytest.mark.parametrize("field", ["name", "text"])
def test_a_lone_surrogate_in_a_jsonl_is_one_line(tmp_path, field):
    row = {"text": "ok", "name": "n", field: "x\\ud800y"}
    (tmp_path / "c.jsonl").write_text(json.dumps(row).replace("\\\\ud800", "\\ud800"))
    with pytest.raises(RnnscopeError, match=f"its {field} holds an unpaired surrogate") as e:
        read_documents(tmp_path / "c.jsonl")
    msg = str(e.value)
    assert "\n" not in msg and "\\ud800" in msg
    msg.encode("utf-8")                          # printable: no lone surrogate in the message itself


def test_a_dangling_link_in_a_corpus_folder_is_named_in_one_line(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello")
    (tmp_path / "docs" / "b.txt").symlink_to(tmp_path / "docs" / "gone.txt")
    with pytest.raises(RnnscopeError, match="b.txt in the corpus cannot be read .*a link to nothing") as e:
        read_documents(tmp_path / "docs")
    assert "free space" not in str(e.value)
