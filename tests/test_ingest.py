"""Annotation parsing: the official Kinetics CSV variants and PySlowFast path lists."""

import pytest

from pipelines.ingest import AnnotationError, class_names, parse_kinetics_csv, parse_path_label


def test_kinetics_400_csv_with_quoted_labels():
    text = (
        "label,youtube_id,time_start,time_end,split\n"
        '"passing American football (in game)",-Ez8VbqtKrY,12,22,train\n'
        "abseiling,0347ZoDXyP0,5,15,train\n"
    )
    rows = parse_kinetics_csv(text, "k400.csv")
    assert [r.video_id for r in rows] == ["-Ez8VbqtKrY_000012_000022", "0347ZoDXyP0_000005_000015"]
    assert rows[0].label == "passing American football (in game)"
    assert class_names(rows) == ["abseiling", "passing American football (in game)"]


def test_kinetics_700_csv_with_is_cc_column():
    text = "label,youtube_id,time_start,time_end,split,is_cc\nabseiling,0347ZoDXyP0,5,15,train,0\n"
    (row,) = parse_kinetics_csv(text, "k700.csv")
    assert (row.video_id, row.label, row.line) == ("0347ZoDXyP0_000005_000015", "abseiling", 2)


def test_unlabelled_test_split_rows_have_no_label():
    text = "youtube_id,time_start,time_end,split\n0347ZoDXyP0,5,15,test\n"
    (row,) = parse_kinetics_csv(text, "test.csv")
    assert row.label == ""


def test_a_path_list_is_not_a_kinetics_csv():
    with pytest.raises(AnnotationError, match="not a Kinetics CSV.*data.format: path_label"):
        parse_kinetics_csv("train/a/x.mp4 0\n", "train.txt")


def test_path_label_lists():
    rows = parse_path_label("train/abseiling/x_000010_000020.mp4 0\nmy videos/clip 1.mp4 3\n\n", "train.txt")
    assert [(r.path, r.label, r.video_id) for r in rows] == [
        ("train/abseiling/x_000010_000020.mp4", "0", "train/abseiling/x_000010_000020"),
        ("my videos/clip 1.mp4", "3", "my videos/clip 1"),
    ]
    assert class_names(rows) == ["0", "1", "2", "3"]  # integer labels index a class list 0..max
    with pytest.raises(AnnotationError, match="train.txt:1: expected '<path> <label>'"):
        parse_path_label("lonely.mp4\n", "train.txt")
