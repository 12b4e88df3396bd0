"""Reading labelled data (CSV/TSV, JSONL, class folders) and the stratified split, on real files."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from rnngen.errors import InputError
from rnngen.labelled import LabelledData, deduplicate, parse_columns, read_labelled, stratified_split

DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def pairs(data: LabelledData) -> list[tuple[str, str]]:
    return list(zip(data.texts, data.labels))


# --- formats ---------------------------------------------------------------------------------------


def test_csv_with_header_quotes_newlines_unicode_crlf_and_bom(tmp_path: Path) -> None:
    content = ('Label,Text\r\n'
               'pos,"great, really great"\r\n'
               'neg,"two\r\nlines"\r\n'
               '\r\n'
               'pos,  café 🙂 naïve  \r\n'
               'neg,"he said ""no"""\r\n')
    path = write(tmp_path / "reviews.csv", codecs.BOM_UTF8 + content.encode())
    data = read_labelled(path)  # header names match case-insensitively; the BOM is not part of "Label"
    assert pairs(data) == [("great, really great", "pos"), ("two\r\nlines", "neg"), ("café 🙂 naïve", "pos"),
                           ('he said "no"', "neg")]
    assert data.classes == ["neg", "pos"] and data.counts() == {"neg": 2, "pos": 2}
    assert data.classes == ["neg", "pos"] and data.label_ids() == [1, 0, 1, 0]
    assert not data.skipped and data.skipped_summary() == ""


def test_tsv_several_text_columns_joined(tmp_path: Path) -> None:
    path = write(tmp_path / "news.tsv", "id\ttitle\tbody\ttopic\n1\tRain\tWet day ahead.\tweather\n"
                                        "2\tGoal!\t  \tsport\n3\t\tMarkets fall.\tmoney\n")
    data = read_labelled(path, text_columns=parse_columns("title,body"), label_column="topic")
    assert pairs(data) == [("Rain Wet day ahead.", "weather"), ("Goal!", "sport"), ("Markets fall.", "money")]
    tab = write(tmp_path / "news.tab", path.read_text())
    assert pairs(read_labelled(tab, text_columns=["title", "body"], label_column="topic")) == pairs(data)


def test_headerless_csv_by_column_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "rows.csv", '"2","Title a","Body a"\n"1","Title b","Body\\b"\n')
    data = read_labelled(path, header=False, text_columns=parse_columns("2,3"), label_column=1)
    assert pairs(data) == [("Title a Body a", "2"), ("Title b Body\\b", "1")]  # backslashes kept as is
    assert data.classes == ["1", "2"]


def test_delimiter_sniffed_for_other_extensions_and_format_override(tmp_path: Path) -> None:
    semi = write(tmp_path / "data.txt", "text;label\nhello there;a\ngood bye;b\n")
    assert pairs(read_labelled(semi)) == [("hello there", "a"), ("good bye", "b")]
    tabs = write(tmp_path / "data.dat", "text\tlabel\nhi, you\ta\nbye, you\tb\n")
    assert pairs(read_labelled(tabs)) == [("hi, you", "a"), ("bye, you", "b")]
    assert pairs(read_labelled(tabs, fmt="tsv")) == [("hi, you", "a"), ("bye, you", "b")]
    jsonl = write(tmp_path / "data.log", '{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n')
    assert pairs(read_labelled(jsonl, fmt="jsonl")) == [("x", "a"), ("y", "b")]


def test_jsonl(tmp_path: Path) -> None:
    lines = [{"text": "naïve café", "label": "fr"}, {"text": "hello", "label": "en", "extra": [1]},
             {"text": "  ", "label": "en"}, {"body": "int label", "stars": 5}, {"body": "x", "stars": True}]
    path = write(tmp_path / "d.jsonl", "\r\n".join(json.dumps(line, ensure_ascii=False) for line in lines[:2])
                 + "\r\n\r\n")
    assert pairs(read_labelled(path)) == [("naïve café", "fr"), ("hello", "en")]
    other = write(tmp_path / "d.ndjson", "\n".join(json.dumps(line) for line in lines[3:]) + "\n")
    assert pairs(read_labelled(other, text_columns="body", label_column="stars")) == [("int label", "5"),
                                                                                       ("x", "true")]


def test_folder_of_class_files(tmp_path: Path) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    write(folder / "Greek.txt", "Άλφα\r\nBeta\r\n\r\n")
    write(folder / "Irish.txt", "Aodh\n  \nBrian")
    write(folder / ".DS_Store", b"\x00\x01")  # hidden files are not classes
    data = read_labelled(folder)
    assert pairs(data) == [("Άλφα", "Greek"), ("Beta", "Greek"), ("Aodh", "Irish"), ("Brian", "Irish")]


def test_folder_of_class_folders(tmp_path: Path) -> None:
    for label, docs in {"ham": ["Lunch at one?\nSee you.", "ok"], "spam": ["WIN a prize!!!\n\n"]}.items():
        (tmp_path / "mail" / label).mkdir(parents=True)
        for i, doc in enumerate(docs):
            write(tmp_path / "mail" / label / f"{i}.txt", doc)
    write(tmp_path / "mail" / "README", "not a class")  # files beside the class folders are ignored
    data = read_labelled(tmp_path / "mail")
    assert pairs(data) == [("Lunch at one?\nSee you.", "ham"), ("ok", "ham"), ("WIN a prize!!!", "spam")]


def test_several_paths_are_concatenated(tmp_path: Path) -> None:
    a = write(tmp_path / "a.csv", "text,label\none,x\n")
    b = write(tmp_path / "b.jsonl", '{"text": "two", "label": "y"}\n')
    assert pairs(read_labelled([a, str(b)])) == [("one", "x"), ("two", "y")]


def test_classes_txt_names_integer_labels(tmp_path: Path) -> None:
    write(tmp_path / "classes.txt", "World\nSports\nBusiness\n")
    path = write(tmp_path / "test.csv", '"3","Stocks up","Dow gains."\n"1","Summit","Leaders meet."\n')
    data = read_labelled(path, header=False, text_columns=[2, 3], label_column=1)
    assert data.labels == ["Business", "World"]
    out_of_range = write(tmp_path / "more.csv", '"4","x","y"\n"1","z","w"\n')
    assert read_labelled(out_of_range, header=False, text_columns=[2], label_column=1).labels == ["4", "1"]


def test_integer_classes_sort_numerically(tmp_path: Path) -> None:
    path = write(tmp_path / "stars.csv", "text,label\na,10\nb,2\nc,1\n")
    assert read_labelled(path).classes == ["1", "2", "10"]


def test_parse_columns() -> None:
    assert parse_columns("title, description") == ["title", "description"]
    assert parse_columns("2,3") == [2, 3]
    for bad in ("a,,b", "0,1"):
        with pytest.raises(InputError):
            parse_columns(bad)


# --- bad rows and bad input ------------------------------------------------------------------------


BAD_ROWS = {  # file name, content, reason, text in the message
    "missing label": ("l.csv", "text,label\ngood,a\nfine,b\nno label,\n", "line 4", "no label"),
    "empty text": ("t.csv", "text,label\ngood,a\nfine,b\n  ,a\n", "line 4", "empty text"),
    "wrong column count": ("w.tsv", "text\tlabel\ngood\ta\nfine\tb\nextra\ta\tb\n", "line 4", "3 columns"),
    "invalid JSON": ("j.jsonl", '{"text": "good", "label": "a"}\n{"text": "fine", "label": "b"}\n{"text": \n',
                     "line 3", "invalid JSON"),
    "not a JSON object": ("o.jsonl", '{"text": "good", "label": "a"}\n{"text": "fine", "label": "b"}\n["x"]\n',
                          "line 3", "JSON array"),
    "missing key": ("k.jsonl", '{"text": "good", "label": "a"}\n{"text": "fine", "label": "b"}\n'
                    '{"body": "x", "label": "a"}\n', "line 3", "'body', 'label'"),
    "undecodable bytes": ("u.csv", b"text,label\ngood,a\nfine,b\ncaf\xe9,a\n", "line 4", "not valid utf-8"),
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_row_names_file_and_line_or_is_skipped(tmp_path: Path, reason: str) -> None:
    name, content, line, phrase = BAD_ROWS[reason]
    path = write(tmp_path / name, content)
    with pytest.raises(InputError) as err:
        read_labelled(path)
    message = str(err.value)
    assert f"{path} {line}" in message and phrase in message and "--skip-bad-rows" in message
    data = read_labelled(path, skip_bad_rows=True)
    assert pairs(data) == [("good", "a"), ("fine", "b")]
    assert data.skipped == {reason: 1} and line in data.skipped_first[reason]
    assert data.skipped_summary() == f"1 bad row skipped (1 {reason})"


def test_skipped_rows_counted_per_reason(tmp_path: Path) -> None:
    path = write(tmp_path / "mixed.csv", "text,label\na,x\n,x\nb,\nc,y\n,y\nd\n")
    data = read_labelled(path, skip_bad_rows=True)
    assert pairs(data) == [("a", "x"), ("c", "y")]
    assert data.skipped == {"empty text": 2, "missing label": 1, "wrong column count": 1}


def test_undecodable_row_reads_with_the_right_encoding(tmp_path: Path) -> None:
    path = write(tmp_path / "latin.csv", "text,label\ncafé,a\nnaïve,b\n".encode("latin-1"))
    assert read_labelled(path, encoding="latin-1").texts == ["café", "naïve"]


def test_undecodable_document_in_class_folder(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        write(tmp_path / label / "ok.txt", f"fine {label}")
    bad = write(tmp_path / "b" / "zz.txt", b"caf\xe9")
    with pytest.raises(InputError, match=f"{bad}: bytes that are not valid utf-8"):
        read_labelled(tmp_path)
    assert read_labelled(tmp_path, skip_bad_rows=True).skipped == {"undecodable bytes": 1}


def test_header_without_the_named_columns_lists_its_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "sentence,sentiment\nhi,pos\nbye,neg\n")
    with pytest.raises(InputError, match=r"no column 'text' \(its columns: 'sentence', 'sentiment'\)"):
        read_labelled(path)
    assert pairs(read_labelled(path, text_columns="Sentence", label_column="SENTIMENT")) == [("hi", "pos"),
                                                                                            ("bye", "neg")]
    with pytest.raises(InputError, match="no column 3"):
        read_labelled(path, header=False, text_columns=[3], label_column=1)
    with pytest.raises(InputError, match="columns are numbers"):
        read_labelled(path, header=False)


@pytest.mark.parametrize("content, phrase", [
    (b"", "is empty"),
    (b"text,label\n", "holds no examples"),
    (b"text,label\n\xff\x00\x01\x02", "NUL bytes"),
    (codecs.BOM_UTF16_LE + "text,label\nhi,a\n".encode("utf-16-le"), "--encoding utf-16"),
    (b"text,label\nhi,a\nho,a\n", "only 1 class ('a'); a classifier needs at least 2"),
])
def test_whole_input_errors(tmp_path: Path, content: bytes, phrase: str) -> None:
    path = write(tmp_path / "d.csv", content)
    with pytest.raises(InputError) as err:
        read_labelled(path)
    assert phrase in str(err.value) and str(path) in str(err.value)


def test_no_usable_rows_says_why(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"body": "x", "label": "a"}\n{"body": "y", "label": "b"}\n')
    with pytest.raises(InputError, match=r"no usable rows .*2 bad rows skipped \(2 missing key\).*line 1"):
        read_labelled(path, skip_bad_rows=True)


def test_bad_paths_and_options(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_labelled(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="holds no files"):
        read_labelled(tmp_path)
    with pytest.raises(InputError, match="unknown format"):
        read_labelled(tmp_path, fmt="xml")
    with pytest.raises(InputError, match="unknown encoding"):
        read_labelled(tmp_path, encoding="klingon")
    path = write(tmp_path / "d.csv", "text,label\nhi,a\nho,b\n")
    with pytest.raises(InputError, match="reads a folder"):
        read_labelled(path, fmt="class-files")


# --- split -----------------------------------------------------------------------------------------


def example_data() -> LabelledData:
    texts = [f"{label}{i % n}" for label, n, total in (("a", 40, 60), ("b", 10, 10), ("c", 3, 3), ("d", 1, 2))
             for i in range(total)]
    return LabelledData(texts, [t[0] for t in texts])


def test_stratified_split_dedupes_and_holds_out_each_class() -> None:
    data = example_data()  # class a repeats 20 texts, d repeats its only one
    train, val = stratified_split(data, val_fraction=0.2, seed=0)
    assert train.duplicates_removed == val.duplicates_removed == 21 == len(data) - len(deduplicate(data))
    assert val.counts() == {"a": 8, "b": 2, "c": 1}  # c: 3 * 0.2 rounds to 0, yet gets one; d: one example
    assert train.counts() == {"a": 32, "b": 8, "c": 2, "d": 1}
    assert not set(pairs(train)) & set(pairs(val))
    assert sorted(pairs(train) + pairs(val)) == sorted(set(pairs(data)))
    assert len(set(pairs(train))) == len(train)


def test_stratified_split_is_deterministic_by_seed() -> None:
    data = example_data()
    first = stratified_split(data, seed=1)
    assert [pairs(half) for half in stratified_split(data, seed=1)] == [pairs(half) for half in first]
    assert pairs(stratified_split(data, seed=2)[1]) != pairs(first[1])


def test_stratified_split_keeps_a_training_example_per_class() -> None:
    train, val = stratified_split(LabelledData(["x", "y", "z", "w"], ["a", "a", "b", "b"]), val_fraction=0.9)
    assert train.counts() == val.counts() == {"a": 1, "b": 1}
    with pytest.raises(InputError, match="between 0 and 1"):
        stratified_split(train, val_fraction=1.0)


def test_label_ids_against_a_model_classes() -> None:
    data = LabelledData(["x", "y"], ["b", "a"])
    assert data.label_ids(["a", "b", "c"]) == [1, 0]
    with pytest.raises(InputError, match="not among the model's classes"):
        data.label_ids(["a", "c"])


# --- the real data sets ----------------------------------------------------------------------------


@needs_shared
def test_real_names_folder() -> None:
    data = read_labelled(DATA / "names")
    assert len(data) == 20_074 and len(data.classes) == 18
    assert data.counts()["Russian"] == 9408 and "Vietnamese" in data.classes
    train, val = stratified_split(data, seed=0)
    assert train.duplicates_removed > 1000  # the names repeat a lot within a class
    assert set(train.classes) == set(val.classes) == set(data.classes)
    assert not set(pairs(train)) & set(pairs(val))


@needs_shared
def test_real_ag_news_test_csv() -> None:
    data = read_labelled(DATA / "ag_news" / "test.csv", header=False, text_columns=parse_columns("2,3"),
                         label_column=1)
    assert len(data) == 7600
    assert data.counts() == {"Business": 1900, "Sci/Tech": 1900, "Sports": 1900, "World": 1900}
    assert data.labels[0] == "Business" and data.texts[0].startswith("Fears for T N pension after talks Unions")
    assert "A second\\team of rocketeers" in data.texts[1]  # literal backslashes kept
