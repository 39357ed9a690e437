"""Dataset format loaders, the bad-image skipper and the `check` CLI, each on a tiny fixture in the official
layout that the test writes itself (8x8 images, the JSON files, tar shards, a Hugging Face dataset)."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from data_recipes.check import check_dataset, main as check_main
from data_recipes.formats import LayoutError, SkipBadImages, open_dataset, parse_spec, skip_bad_images
from data_recipes.samples import MissingImageError, Sample, UnreadableImageError, collate_samples

REPO = Path(__file__).resolve().parent.parent


def write_image(path: Path, colour=(200, 30, 30), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def image_bytes(colour=(10, 200, 10), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def karpathy_entry(cocoid, split, captions, folder="val2014"):
    filename = f"COCO_{folder}_{cocoid:012d}.jpg"
    return {"filepath": folder, "filename": filename, "split": split, "cocoid": cocoid, "imgid": cocoid,
            "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions]}


@pytest.fixture
def coco_karpathy(tmp_path):
    """train (1), restval (1), val (1), test (2: one corrupt image)."""
    entries = [karpathy_entry(1, "train", ["A cat.", "A small cat."], "train2014"),
               karpathy_entry(2, "restval", ["A dog."]), karpathy_entry(3, "val", ["A bird."]),
               karpathy_entry(4, "test", ["A car."]), karpathy_entry(5, "test", ["A bus."])]
    for e in entries:
        write_image(tmp_path / e["filepath"] / e["filename"])
    write_corrupt(tmp_path / "val2014" / entries[3]["filename"])
    write_json(tmp_path / "dataset_coco.json", {"images": entries, "dataset": "coco"})
    return tmp_path


def test_coco_karpathy_splits_and_fields(coco_karpathy):
    assert {s: len(open_dataset(f"coco_karpathy:{coco_karpathy}?split={s}")) for s in ("train", "val", "test")} \
        == {"train": 2, "val": 1, "test": 2}  # restval counts as train
    train = open_dataset(f"coco_karpathy:{coco_karpathy}?split=train")
    assert train.task_fields == ("captions",)
    sample = train[0]
    assert isinstance(sample, Sample) and sample.image_id == 1 and sample.captions == ["A cat.", "A small cat."]
    assert sample._image is None  # lazily opened
    assert sample.image.size == (8, 8) and sample.image.mode == "RGB"
    assert sample.image_name.endswith("train2014/COCO_train2014_000000000001.jpg")
    as_dict = sample.to_dict()
    assert as_dict["image_id"] == 1 and as_dict["captions"] == sample.captions and "question" not in as_dict


def test_corrupt_image_is_skipped_counted_and_logged(coco_karpathy, caplog):
    test = open_dataset(f"coco_karpathy:{coco_karpathy}?split=test")
    with pytest.raises(UnreadableImageError, match="COCO_val2014_000000000004.jpg"):
        test[0].image
    safe = open_dataset(f"coco_karpathy:{coco_karpathy}?split=test", skip_bad=True)
    assert isinstance(safe, SkipBadImages) and len(safe) == 2 and safe.task_fields == ("captions",)
    with caplog.at_level(logging.WARNING, logger="data_recipes.formats"):
        samples = [safe[i] for i in range(len(safe))]  # the run continues past the bad file
    assert [s.image_id for s in samples] == [5, 5]
    assert safe.skipped == {"unreadable": 1, "missing": 0}
    assert "COCO_val2014_000000000004.jpg" in caplog.text
    assert safe.report()["unreadable"] == 1


def test_missing_annotation_file_names_it(tmp_path):
    with pytest.raises(LayoutError) as error:
        open_dataset(f"coco_karpathy:{tmp_path}")
    message = str(error.value)
    assert str(tmp_path / "dataset_coco.json") in message and "train2014" in message and "no such file" in message
    with pytest.raises(LayoutError, match="v2_OpenEnded_mscoco_val2014_questions.json"):
        open_dataset(f"vqav2:{tmp_path}?split=val")
    with pytest.raises(LayoutError, match="instances_val2017.json"):
        open_dataset(f"coco_instances:{tmp_path}?split=val")
    with pytest.raises(LayoutError, match="dataset_flickr30k.json"):
        open_dataset(f"flickr30k:{tmp_path}")


def test_flickr30k(tmp_path):
    entries = [{"filename": f"{i}.jpg", "imgid": i, "split": split, "sentences": [{"raw": f"caption {i}"}] * 5}
               for i, split in enumerate(["train", "train", "val", "test"])]
    for e in entries:
        write_image(tmp_path / "flickr30k-images" / e["filename"])
    write_json(tmp_path / "dataset_flickr30k.json", {"images": entries, "dataset": "flickr30k"})
    train = open_dataset(f"flickr30k:{tmp_path}?split=train")
    assert len(train) == 2 and len(open_dataset(f"flickr30k:{tmp_path}?split=test")) == 1
    assert train[1].image_id == 1 and len(train[1].captions) == 5 and train[1].image.size == (8, 8)


@pytest.fixture
def vqa(tmp_path):
    """val: 3 questions on 2 images (image 2 is corrupt); test2015: 1 question, no annotations."""
    for image_id in (1, 2):
        write_image(tmp_path / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    write_corrupt(tmp_path / "val2014" / "COCO_val2014_000000000002.jpg")
    write_image(tmp_path / "test2015" / "COCO_test2015_000000000009.jpg")
    questions = [{"image_id": 1, "question": "What colour is it?", "question_id": 10},
                 {"image_id": 1, "question": "Is it red?", "question_id": 11},
                 {"image_id": 2, "question": "How many?", "question_id": 20}]
    answers = {10: ["red"] * 8 + ["pink"] * 2, 11: ["yes"] * 10, 20: ["2"] * 10}
    types = {10: "other", 11: "yes/no", 20: "number"}
    annotations = [{"question_id": q, "image_id": q // 10, "question_type": "what", "answer_type": types[q],
                    "multiple_choice_answer": a[0],
                    "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(a)]}
                   for q, a in answers.items()]
    write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
               {"questions": questions, "data_subtype": "val2014"})
    write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    write_json(tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json",
               {"questions": [{"image_id": 9, "question": "What is this?", "question_id": 90}]})
    return tmp_path


def test_vqav2_questions_answers_and_test_split(vqa):
    val = open_dataset(f"vqav2:{vqa}?split=val")
    assert len(val) == 3 and set(val.task_fields) >= {"question", "answers"}
    sample = val[0]
    assert (sample.image_id, sample.question_id, sample.question) == (1, 10, "What colour is it?")
    assert len(sample.answers) == 10 and sample.answers.count("red") == 8
    assert (sample.multiple_choice_answer, sample.answer_type, sample.question_type) == ("red", "other", "what")
    assert sample.image.size == (8, 8)
    test = open_dataset(f"vqav2:{vqa}?split=test")
    assert len(test) == 1 and test[0].answers is None and test[0].image.size == (8, 8)
    safe = skip_bad_images(val)
    assert [safe[i].question_id for i in range(3)] == [10, 11, 10]  # the corrupt image's question wraps around
    assert safe.skipped["unreadable"] == 1


@pytest.fixture
def coco_instances(tmp_path):
    """val2017: three 8x8 images (one without boxes), one corrupt image."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 8, "height": 8} for i in (1, 2, 3, 4)]
    for image in images:
        write_image(tmp_path / "val2017" / image["file_name"])
    write_corrupt(tmp_path / "val2017" / images[3]["file_name"])
    annotations = [{"id": 1, "image_id": 1, "bbox": [1, 1, 4, 5], "category_id": 18, "iscrowd": 0, "area": 20},
                   {"id": 2, "image_id": 1, "bbox": [0, 0, 8, 8], "category_id": 1, "iscrowd": 1, "area": 64},
                   {"id": 3, "image_id": 2, "bbox": [2, 2, 2, 2], "category_id": 1, "iscrowd": 0, "area": 4},
                   {"id": 4, "image_id": 4, "bbox": [2, 2, 2, 2], "category_id": 1, "iscrowd": 0, "area": 4}]
    categories = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 18, "name": "dog"}]
    write_json(tmp_path / "annotations" / "instances_val2017.json",
               {"images": images, "annotations": annotations, "categories": categories})
    return tmp_path


def test_coco_instances(coco_instances):
    val = open_dataset(f"coco_instances:{coco_instances}?split=val")
    assert len(val) == 4 and val.categories == {1: "person", 18: "dog"} and val.class_names == ["person", "dog"]
    sample = val[0]
    assert sample.boxes == [[1.0, 1.0, 4.0, 5.0], [0.0, 0.0, 8.0, 8.0]]
    assert sample.category_ids == [18, 1] and sample.categories == ["dog", "person"] and sample.iscrowd == [0, 1]
    assert (sample.width, sample.height) == (8, 8) and sample.image.size == (8, 8)
    assert val[2].boxes == []  # an image without annotations is kept...
    assert len(open_dataset(f"coco_instances:{coco_instances}?split=val&skip_empty=1")) == 3  # ...unless asked
    safe = skip_bad_images(val)
    assert [safe[i].image_id for i in range(4)] == [1, 2, 3, 1] and safe.skipped["unreadable"] == 1


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "train"
    for folder, colour in (("n01440764", (255, 0, 0)), ("n01443537", (0, 0, 255))):
        for i in range(3):
            write_image(root / folder / f"{folder}_{i}.JPEG", colour)
    write_corrupt(root / "n01443537" / "n01443537_broken.JPEG")
    (root / "n01443537" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_labels_and_class_names(imagefolder, tmp_path):
    plain = open_dataset(f"imagefolder:{imagefolder}")
    assert len(plain) == 7 and plain.class_names == ["n01440764", "n01443537"]
    assert [s.label for s in (plain[0], plain[6])] == [0, 1] and plain[0].image.getpixel((0, 0))[0] > 200
    (tmp_path / "names.txt").write_text("tench\ngoldfish\n")
    names = open_dataset(f"imagefolder:{imagefolder}?names={tmp_path / 'names.txt'}").class_names
    assert names == ["tench", "goldfish"]
    write_json(tmp_path / "imagenet_class_index.json", {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]})
    assert open_dataset(f"imagefolder:{imagefolder}?names={tmp_path / 'imagenet_class_index.json'}").class_names \
        == ["tench", "goldfish"]
    write_json(imagefolder / "classnames.json", {"n01443537": "goldfish", "n01440764": "tench"})
    assert open_dataset(f"imagefolder:{tmp_path}?split=train").class_names == ["tench", "goldfish"]
    with pytest.raises(ValueError, match="3 class names for 2 class folders"):
        (tmp_path / "bad.txt").write_text("a\nb\nc\n")
        open_dataset(f"imagefolder:{imagefolder}?names={tmp_path / 'bad.txt'}")
    with pytest.raises(LayoutError, match="no such folder"):
        open_dataset(f"imagefolder:{tmp_path / 'nope'}")


def test_skip_bad_images_in_dataloader_workers(imagefolder):
    safe = open_dataset(f"imagefolder:{imagefolder}", skip_bad=True)
    loader = DataLoader(safe, batch_size=4, num_workers=2, collate_fn=collate_samples)
    labels = [s.label for batch in loader for s in batch]
    assert sorted(labels) == [0, 0, 0, 0, 1, 1, 1]  # the broken file (last) wraps around to item 0
    assert safe.skipped["unreadable"] == 1  # counted in a worker, seen in the main process


def write_shard(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path):
    write_shard(tmp_path / "shard-000000.tar", {
        "a.jpg": image_bytes(), "a.txt": b"a green square",
        "b.png": image_bytes(fmt="PNG"), "b.json": json.dumps({"caption": "from json", "source": "web"}).encode(),
        "c.jpg": np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes(), "c.txt": b"corrupt"})
    write_shard(tmp_path / "shard-000001.tar", {
        "d.jpg": image_bytes(), "d.json": json.dumps({"question": "q?", "answers": ["x"], "image_id": 42}).encode()})
    return tmp_path


def test_webdataset_streams_shards(shards):
    pytest.importorskip("webdataset")
    spec = f"webdataset:{shards}/shard-{{000000..000001}}.tar"
    stream = open_dataset(spec)
    assert len(stream) == 4
    samples = {s.image_id: s for s in stream}
    assert samples["a"].captions == ["a green square"] and samples["a"].image.size == (8, 8)
    assert samples["b"].captions == ["from json"] and samples["b"].extra == {"source": "web"}
    assert samples[42].question == "q?" and samples[42].answers == ["x"]
    safe = open_dataset(spec, skip_bad=True)
    assert sorted(str(s.image_id) for s in safe) == ["42", "a", "b"] and safe.skipped["unreadable"] == 1
    loader = DataLoader(open_dataset(spec, skip_bad=True), batch_size=2, num_workers=2, collate_fn=collate_samples)
    assert sorted(str(s.image_id) for batch in loader for s in batch) == ["42", "a", "b"]  # one shard per worker


def test_webdataset_missing_shards(shards):
    pytest.importorskip("webdataset")
    partial = open_dataset(f"webdataset:{shards}/shard-{{000000..000002}}.tar")
    assert partial.missing_shards == [f"{shards}/shard-000002.tar"] and len(list(partial)) == 4
    report = check_dataset(f"webdataset:{shards}/shard-{{000000..000002}}.tar", progress=False)
    assert (report.samples, report.missing_files, report.unreadable_images) == (4, 1, 1)
    with pytest.raises(LayoutError, match="shard-000007.tar: no such file"):
        open_dataset(f"webdataset:{shards}/shard-{{000007..000008}}.tar")


def test_hf_save_to_disk_with_column_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    rows = {"img": [{"bytes": image_bytes(), "path": None}, {"bytes": b"not an image at all", "path": None},
                    {"bytes": image_bytes(fmt="PNG"), "path": None}],
            "text": ["one", "two", "three"], "label": [0, 1, 1]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(tmp_path / "ds")
    ds = open_dataset(f"hf:{tmp_path / 'ds'}?split=train&image=img&caption=text")
    assert len(ds) == 3 and ds.class_names == ["cat", "dog"] and set(ds.task_fields) == {"captions", "label"}
    assert ds[0].captions == ["one"] and ds[0].label == 0 and ds[0].image.size == (8, 8)
    with pytest.raises(UnreadableImageError):
        ds[1].image
    safe = skip_bad_images(ds)
    assert [safe[i].captions[0] for i in range(3)] == ["one", "three", "three"] and safe.skipped["unreadable"] == 1
    with pytest.raises(ValueError, match="no split 'test'"):
        open_dataset(f"hf:{tmp_path / 'ds'}?split=test")
    with pytest.raises(ValueError, match="no column 'picture'"):
        open_dataset(f"hf:{tmp_path / 'ds'}?image=picture")


def test_hf_load_dataset_imagefolder(tmp_path):
    pytest.importorskip("datasets")
    root = tmp_path / "folder"
    for name in ("x.png", "y.png"):
        write_image(root / "train" / name)
    (root / "train" / "metadata.jsonl").write_text(
        '{"file_name": "x.png", "caption": "an x"}\n{"file_name": "y.png", "caption": "a y"}\n')
    ds = open_dataset(f"hf:{root}?split=train&cache_dir={tmp_path / 'cache'}")
    assert len(ds) == 2 and sorted(ds[i].captions[0] for i in range(2)) == ["a y", "an x"]
    assert ds[0].image.size == (8, 8)


def test_spec_parsing_and_errors(tmp_path):
    assert parse_spec("hf:/data/my_ds?split=train&image=img&caption=text") == (
        "hf", "/data/my_ds", {"split": "train", "image": "img", "caption": "text"})
    assert parse_spec("shapes") == ("shapes", None, {})
    with pytest.raises(ValueError, match="unknown dataset format 'coco'"):
        open_dataset("coco:/x")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['splt'\]"):
        open_dataset(f"imagefolder:{tmp_path}?splt=val")
    with pytest.raises(ValueError, match="needs a path"):
        open_dataset("vqav2")


def test_shapes_builtin_dataset(tmp_path):
    shapes = pytest.importorskip("data_recipes.shapes")
    if not hasattr(shapes, "build_shapes_dataset"):
        pytest.skip("data_recipes.shapes has no build_shapes_dataset yet")
    spec = f"shapes:{tmp_path / 'shapes'}?train_size=3&val_size=2&test_size=1&split=val"
    val = open_dataset(spec)
    sample = val[0]
    assert len(val) == 2 and sample.captions and sample.boxes and len(sample.categories) == len(sample.boxes)
    assert 0 <= sample.label < len(val.class_names) and sample.image.size == (64, 64)
    vqa = open_dataset(spec + "&task=vqa")
    assert len(vqa) == sum(len(q) for q in val.data["questions"]) and vqa[0].answers == [vqa[0].multiple_choice_answer]
    assert check_dataset(spec, progress=False).problems == 0
    with pytest.raises(ValueError, match="unknown option"):
        open_dataset("shapes?colour=red")


def test_check_reports_each_planted_problem(coco_karpathy, coco_instances, vqa, capsys):
    # captions: test split has one corrupt image; plant a missing file and an empty caption in val
    data = json.loads((coco_karpathy / "dataset_coco.json").read_text())
    data["images"].append(karpathy_entry(6, "test", ["A train.", "  "]))  # its image is never written: missing
    data["images"].append(karpathy_entry(7, "test", []))
    write_image(coco_karpathy / "val2014" / data["images"][-1]["filename"])
    write_json(coco_karpathy / "dataset_coco.json", data)
    spec = f"coco_karpathy:{coco_karpathy}?split=test"
    with pytest.raises(MissingImageError, match="COCO_val2014_000000000006.jpg"):
        open_dataset(spec)[2].image
    report = check_dataset(spec, progress=False)
    assert (report.samples, report.images, report.missing_files, report.unreadable_images, report.empty_captions) \
        == (4, 2, 1, 1, 2)
    assert check_main([spec, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "missing files" in out and "COCO_val2014_000000000006.jpg" in out and "FAILED" in out

    # boxes: one outside the 8x8 image, one with zero width; plus the corrupt image already in the fixture
    data = json.loads((coco_instances / "annotations" / "instances_val2017.json").read_text())
    data["annotations"] += [{"id": 9, "image_id": 2, "bbox": [5, 5, 6, 2], "category_id": 1, "iscrowd": 0},
                            {"id": 10, "image_id": 3, "bbox": [1, 1, 0, 3], "category_id": 1, "iscrowd": 0}]
    data["images"].append({"id": 5, "file_name": "gone.jpg", "width": 8, "height": 8})
    write_json(coco_instances / "annotations" / "instances_val2017.json", data)
    report = check_dataset(f"coco_instances:{coco_instances}?split=val", progress=False)
    assert (report.samples, report.missing_files, report.unreadable_images, report.bad_boxes) == (5, 1, 1, 2)

    # VQA: a question whose annotation has no answers; the corrupt image is shared by one question
    annotations = json.loads((vqa / "v2_mscoco_val2014_annotations.json").read_text())
    annotations["annotations"][1]["answers"] = []
    write_json(vqa / "v2_mscoco_val2014_annotations.json", annotations)
    report = check_dataset(f"vqav2:{vqa}?split=val", progress=False)
    assert (report.samples, report.images, report.unreadable_images, report.unanswered_questions) == (3, 1, 1, 1)
    assert check_dataset(f"vqav2:{vqa}?split=val", limit=2, progress=False).samples == 2


def test_check_clean_fixture_returns_0_and_cli_entry_point(coco_karpathy, tmp_path):
    clean = f"coco_karpathy:{coco_karpathy}?split=train"
    assert check_main([clean, "--no-progress", "--json", str(tmp_path / "report.json")]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["problems"] == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "data_recipes", "check", f"coco_karpathy:{coco_karpathy}?split=test"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 1 and "unreadable images" in run.stdout and "1" in run.stdout
    run = subprocess.run([sys.executable, "-m", "data_recipes", "check", f"vqav2:{tmp_path / 'none'}?split=val"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 1 and "v2_OpenEnded_mscoco_val2014_questions.json: no such file" in run.stderr
