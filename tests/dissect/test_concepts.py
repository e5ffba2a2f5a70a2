"""Concept sets: built-in lists, Broden labels, and text files with every way they can go wrong."""
import sys
import types
import warnings

import pytest

from lwta_vision.dissect.concepts import (
    BUILTIN_CONCEPT_SETS,
    load_broden_concepts,
    load_concept_set,
    read_concept_file,
)


# ---------------------------------------------------------------------------------------------- built-ins
def test_builtin_names():
    assert set(BUILTIN_CONCEPT_SETS) == {"20k", "imagenet1k", "cifar10", "cifar100", "generated"}


def test_20k_has_20000_unique_lowercase_alphabetic_words():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        words = load_concept_set("20k")
    assert len(words) == 20_000
    assert len(set(words)) == 20_000
    assert all(w.isascii() and w.isalpha() and w == w.lower() for w in words)
    assert words[:3] == ["the", "to", "and"]  # frequency order


def test_imagenet1k_has_1000_unique_names_in_class_order():
    names = load_concept_set("imagenet1k")
    assert len(names) == 1000
    assert len(set(names)) == 1000
    assert names[0] == "tench"
    assert names[1] == "goldfish"
    assert names[134] == "crane bird"
    assert names[517] == "construction crane"
    assert names[999] == "toilet paper"


def test_cifar_sets():
    cifar10 = load_concept_set("cifar10")
    assert cifar10 == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    cifar100 = load_concept_set("cifar100")
    assert len(cifar100) == 100 and len(set(cifar100)) == 100
    assert cifar100[:3] == ["apple", "aquarium fish", "baby"]
    assert cifar100[-1] == "worm"
    assert not any("_" in n for n in cifar100)


def test_generated_reads_the_data_module_lazily(monkeypatch):
    fake = types.ModuleType("lwta_vision.datasets.shapes")
    fake.CONCEPT_NAMES = ["red", "circle", "striped"]
    monkeypatch.setitem(sys.modules, "lwta_vision.datasets.shapes", fake)
    assert load_concept_set("generated") == ["red", "circle", "striped"]


def test_generated_import_failure_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "lwta_vision.datasets.shapes", None)  # makes the import fail
    with pytest.raises(ImportError, match="CONCEPT_NAMES"):
        load_concept_set("generated")


# ---------------------------------------------------------------------------------------------- Broden
def _broden(tmp_path, rows):
    folder = tmp_path / "broden1_224"
    folder.mkdir()
    lines = ["number,name,category,frequency,coverage,syns"] + rows
    (folder / "label.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_broden_labels(tmp_path):
    folder = _broden(
        tmp_path,
        [
            "0,-,,0,0,",
            "2,wall,object(2000),2000,12.5,",
            "1,red-c,color(289),289,9.14,",
            "3,street-s,scene(300),300,100.0,",
            "4,pool_table,object(20),20,1.0,billiard table",
            "5,street,object(40),40,2.0,",
            "6,plastic-opaque,material(5),5,0.1,",
        ],
    )
    assert load_concept_set(f"broden:{folder}") == ["red", "wall", "street", "pool table", "plastic-opaque"]
    assert load_broden_concepts(folder, clean=False) == [
        "red-c", "wall", "street-s", "pool_table", "street", "plastic-opaque"
    ]  # fmt: skip


def test_broden_missing_label_csv(tmp_path):
    with pytest.raises(ValueError, match="no label.csv"):
        load_concept_set(f"broden:{tmp_path}")


def test_broden_folder_given_as_plain_path_gets_a_hint(tmp_path):
    folder = _broden(tmp_path, ["1,wall,object(1),1,1.0,"])
    with pytest.raises(ValueError, match="looks like a Broden folder"):
        load_concept_set(str(folder))


# ---------------------------------------------------------------------------------------------- text files
def test_text_file_strips_skips_blanks_and_dedupes_with_warning(tmp_path):
    path = tmp_path / "concepts.txt"
    path.write_text("  dog\n\ncat \r\n\t\nDog\ndog\nbird\ncat\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="dropped 2 duplicate"):
        concepts = load_concept_set(str(path))
    assert concepts == ["dog", "cat", "Dog", "bird"]


def test_text_file_accepts_pathlike_and_utf8_bom(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9\nna\xc3\xafve\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_concept_set(path) == ["café", "naïve"]
        assert read_concept_file(path) == ["café", "naïve"]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n\t\n"])
def test_empty_text_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"empty\.txt has no concepts"):
        load_concept_set(str(path))


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("dog\ncafé\n".encode("latin-1"))  # é = 0xe9 at byte offset 7
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8 \(byte 0xe9 at offset 7\).*re-encode"):
        load_concept_set(str(path))


def test_binary_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"PK\x03\x04\x00\x00\xff\xfe")
    with pytest.raises(ValueError, match=r"weights\.bin looks binary"):
        load_concept_set(str(path))


@pytest.mark.parametrize("spec", ["21k", "imagenet", "no/such/file.txt"])
def test_unknown_name_or_missing_file_lists_builtins(spec):
    builtins = r"20k, imagenet1k, cifar10, cifar100, generated"
    with pytest.raises(ValueError, match=rf"unknown concept set .*{builtins}.*text file"):
        load_concept_set(spec)


def test_read_concept_file_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_concept_file(tmp_path / "nope.txt")


def test_builtin_name_wins_over_file_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10").write_text("mine\n", encoding="utf-8")
    assert load_concept_set("cifar10")[0] == "airplane"
    assert load_concept_set("./cifar10") == ["mine"]
