"""The training engine under both launchers: a folder holding another run is never destroyed, a resume checks the
run id and the recipe, torn logs are read tolerantly, skipped images are reported, and the data path (workers,
augmentation) keeps resume exact."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import pretrain
from launch.training.checkpoints import RunFolderError

from pretrain_runs import model_state, read_log, small_overrides

pytestmark = pytest.mark.usefixtures("module_cache")


def run(output: Path, *extra: str, steps: int = 4, **overrides) -> dict:
    return pretrain.main(["--output", str(output), "--no-eval", "--no-progress", *extra,
                          *small_overrides(steps, **{"checkpoint.every_steps": 2, **overrides})])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("finished")
    run(output)
    return output


def snapshot(output: Path) -> dict[str, bytes]:
    """Every file of a run folder, by relative path."""
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


def test_a_new_run_in_a_folder_holding_another_run_is_refused_and_changes_nothing(finished_run):
    before = snapshot(finished_run)
    with pytest.raises(RunFolderError, match=r"holds another run .*--resume.*--overwrite"):
        run(finished_run, steps=2)
    assert snapshot(finished_run) == before  # not even recipe.yaml was rewritten
    proc = subprocess.run([sys.executable, "-m", "launch.pretrain", "--output", str(finished_run), "--no-eval",
                           *small_overrides(2)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr, proc.stderr[-2000:]
    assert snapshot(finished_run) == before


def test_every_checkpoint_carries_the_run_id(finished_run):
    run_id = json.loads((finished_run / "run.json").read_text())["run_id"]
    clients = [json.loads((c / "client.json").read_text()) for c in (finished_run / "checkpoints").glob("step_*")]
    assert len(clients) == 2 and {c["run_id"] for c in clients} == {run_id}
    assert [c["step"] for c in sorted(clients, key=lambda c: c["step"])] == [2, 4]


def test_overwrite_replaces_the_run_with_a_new_one(finished_run, tmp_path):
    output = tmp_path / "again"
    run(output, steps=2)
    old_id = json.loads((output / "run.json").read_text())["run_id"]
    (output / "notes.txt").write_text("mine")  # not the run's: --overwrite leaves it alone
    run(output, "--overwrite", steps=4)
    assert json.loads((output / "run.json").read_text())["run_id"] != old_id
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000004"]
    assert [line["step"] for line in read_log(output)] == [1, 2, 3, 4]
    assert (output / "notes.txt").read_text() == "mine"


def test_resume_names_what_differs_in_the_recipe(finished_run):
    before = snapshot(finished_run)
    with pytest.raises(ValueError, match=r"recipe differs .*steps: 4 -> 8; optimizer\.lr: 0\.001 -> 0\.002"):
        run(finished_run, "--resume", steps=8, **{"optimizer.lr": 0.002})
    assert snapshot(finished_run) == before


def test_resume_refuses_a_checkpoint_of_another_run(finished_run, tmp_path):
    import shutil

    output = tmp_path / "mixed"
    shutil.copytree(finished_run, output)
    (output / "run.json").write_text(json.dumps({"run_id": "someone-else", "launcher": "pretrain"}))
    with pytest.raises(RunFolderError, match="belongs to run .* but .* is run someone-else"):
        run(output, "--resume")


def test_a_torn_last_log_line_does_not_break_resume(finished_run, tmp_path):
    import shutil

    output = tmp_path / "torn"
    shutil.copytree(finished_run, output)
    shutil.rmtree(output / "checkpoints" / "step_000004")
    (output / "checkpoints" / "latest").write_text("step_000002")
    with open(output / "log.jsonl", "a") as log:
        log.write('{"event": "step", "step": 5, "task": "retr')  # a crash in the middle of a write
    run(output, "--resume")
    assert [line["step"] for line in read_log(output)] == [1, 2, 3, 4]
    resumed = model_state(output, 4)
    for key, value in model_state(finished_run, 4).items():
        assert torch.equal(resumed[key], value), key


def test_skipped_images_go_to_the_log_and_the_summary(tmp_path, monkeypatch):
    """Pictures that cannot be decoded are skipped by the data layer; the run counts them per task."""
    from data_recipes import samples

    original = samples.load_image

    def load_image(source, name=None, mode="RGB"):
        if name in ("shapes[train][0]", "shapes[train][1]"):
            raise samples.UnreadableImageError(name, "cannot identify image file")
        return original(source, name, mode)

    monkeypatch.setattr(samples, "load_image", load_image)
    output = tmp_path / "bad-images"
    result = run(output, steps=12, **{"checkpoint.every_steps": 0})
    total = sum(counts.get("unreadable", 0) for counts in result["skipped_images"].values())
    assert total >= 1, result["skipped_images"]
    summary = read_log(output, "summary")[-1]
    assert summary["skipped_images"] == result["skipped_images"]
    assert json.loads((output / "summary.json").read_text())["skipped_images"] == result["skipped_images"]


def test_decoding_in_workers_resumes_exactly(tmp_path):
    """workers=2: DataLoader processes decode ahead of the step; a resumed run, with another worker count even,
    sees the same batches and ends with the same weights as an uninterrupted one without workers."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight, steps=4)
    run(split, "--stop-after", "2", steps=4, workers=2)
    run(split, "--resume", steps=4, workers=1)
    assert [(l["step"], l["loss"]) for l in read_log(split)] == [(l["step"], l["loss"]) for l in read_log(straight)]
    resumed = model_state(split, 4)
    for key, value in model_state(straight, 4).items():
        assert torch.equal(resumed[key], value), key


def test_augmentation_is_seeded_per_sample_and_refuses_target_changing_transforms():
    from PIL import Image

    from launch.training.augment import build_augmentation
    from launch.training.data import TaskSamples
    from launch.training.recipe import load_recipe

    picture = Image.new("RGB", (32, 32), (120, 60, 200))
    dataset = [{"image": picture, "caption": "a purple square"}] * 4
    spec = [{"ColorJitter": {"brightness": 0.5, "hue": 0.2}}, {"RandomAffine": {"degrees": 10}}]
    samples = TaskSamples(dataset, "captioning", seed=7, augment=build_augmentation(spec, "captioning"))
    again = TaskSamples(dataset, "captioning", seed=7, augment=build_augmentation(spec, "captioning"))
    pixels = lambda sample: np.asarray(sample["image"]).tolist()  # noqa: E731
    assert pixels(samples[(0, 1)]) == pixels(again[(0, 1)])      # the same draw for (epoch, index)
    assert pixels(samples[(0, 1)]) != pixels(samples[(0, 2)])    # another sample, another draw
    assert pixels(samples[(0, 1)]) != pixels(samples[(1, 1)])    # another epoch, another draw
    assert samples[(0, 1)]["caption"] == "a purple square"

    assert build_augmentation(["RandomHorizontalFlip"], "classification") is not None
    with pytest.raises(ValueError, match=r"tasks.captioning.augment: expected RandomHorizontalFlip mirrors the "
                                         r"picture, swapping 'left' and 'right'"):
        load_recipe("tiny", ["tasks.captioning.augment=[RandomHorizontalFlip]"])
    with pytest.raises(ValueError, match=r"tasks.vqa.augment: expected RandomResizedCrop may crop an object out"):
        load_recipe("tiny", ["tasks.vqa.augment=[{RandomResizedCrop: {size: 64}}]"])
    with pytest.raises(ValueError, match=r"tasks.retrieval.augment: expected Blurry: not a torchvision"):
        load_recipe("tiny", ["tasks.retrieval.augment=[Blurry]"])
    # a task that reads the boxes refuses what moves the objects: detection always, text to image with object_weight
    moved = "[{RandomAffine: {degrees: 10}}]"
    with pytest.raises(ValueError, match=r"tasks.detection.augment: expected RandomAffine moves the picture's "
                                         r"objects, and the detection task reads their boxes"):
        load_recipe("tiny", [f"tasks.detection.augment={moved}"])
    with pytest.raises(ValueError, match=r"tasks.text_to_image.augment: expected RandomAffine moves the picture's "
                                         r"objects, and the text_to_image task reads their boxes"):
        load_recipe("tiny", [f"tasks.text_to_image.augment={moved}"])
    assert load_recipe("tiny", [f"tasks.text_to_image.augment={moved}", "tasks.text_to_image.kwargs={}"])
    with pytest.raises(ValueError, match=r"tasks.text_to_image.kwargs \['object_weight'\] do not fit task "
                                         r"'text_to_image': text_to_image: object_weight nan; expected a finite"):
        load_recipe("tiny", ["tasks.text_to_image.kwargs={object_weight: .nan}"]).build_tasks()


def test_recipes_ship_inside_the_package_and_nothing_edits_sys_path():
    import importlib.resources

    import launch

    assert (importlib.resources.files("launch") / "recipes" / "tiny.yaml").is_file()
    root = Path(launch.__file__).resolve().parent.parent
    offenders = [str(path.relative_to(root)) for folder in ("launch", "tasks", "uniperceiver", "internimage", "ops",
                                                            "data_recipes", "eval", "tests")
                 for path in (root / folder).rglob("*.py") if "sys.path." in path.read_text()
                 and path.name != "test_training_engine.py"]
    assert offenders == []


def test_eval_every_steps_logs_each_tasks_loss_on_its_eval_dataset(tmp_path):
    output = tmp_path / "evaluated"
    eval_sets = {f"tasks.{name}.eval_dataset": "shapes?split=val&train_size=48&val_size=8&test_size=8"
                 + ("&task=vqa" if name == "vqa" else "") for name in ("retrieval", "captioning", "vqa")}
    run(output, steps=4, **eval_sets, **{"eval.every_steps": 2, "eval.batch_size": 4, "eval.max_samples": 8})
    evaluations = read_log(output, "eval")
    assert [e["step"] for e in evaluations] == [2]  # the last step is followed by the final evaluation instead
    assert sorted(evaluations[0]["loss"]) == ["captioning", "retrieval", "vqa"]
    assert all(0 < value < 20 for value in evaluations[0]["loss"].values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tb")).Reload()
    assert {"eval/loss/retrieval", "eval/loss/captioning", "eval/loss/vqa"} <= set(events.Tags()["scalars"])


def test_resume_takes_a_key_added_since_the_checkpoint_at_its_default():
    """A checkpoint's recipe written before a recipe key existed resumes when the key is at its default; a key
    that differs is still named."""
    from launch.pretraining import check_same_recipe
    from launch.training.recipe import load_recipe
    recipe = load_recipe("tiny")
    saved = recipe.to_dict()
    del saved["optimizer"]["diffusion_lr_scale"]
    check_same_recipe(saved, recipe, Path("step_000004"))
    changed = load_recipe("tiny", ["optimizer.diffusion_lr_scale=0.5"])
    with pytest.raises(ValueError, match=r"step_000004 was trained with: optimizer\.diffusion_lr_scale: 1\.0 -> 0\.5"):
        check_same_recipe(saved, changed, Path("step_000004"))
