"""launch/training/streaming.py: shards split over ranks and DataLoader workers cover an epoch exactly once, a
resumed stream repeats the uninterrupted one (with workers and without), bad images are skipped and counted, a
new worker count restarts the readers with a note, and a pretraining run on shards resumes exactly."""
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_recipes.formats import open_dataset
from launch.training.streaming import ShardStream

pytest.importorskip("webdataset")
pytestmark = pytest.mark.usefixtures("module_cache")

SHARDS, PER_SHARD = 6, 5


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (value * 8 % 256, value * 3 % 256, 255 - value * 5 % 256)).save(out, format="PNG")
    return out.getvalue()


def write_shards(folder: Path, corrupt: str | None = None) -> str:
    """SHARDS tars of PER_SHARD samples (key.png + key.txt, caption "sample <shard>-<i>"); `corrupt` names a
    key whose png is not an image. Returns the webdataset SPEC."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(SHARDS):
        with tarfile.open(folder / f"shard-{shard:06d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key = f"s{shard}-{i}"
                image = b"not a png" if key == corrupt else png(shard * PER_SHARD + i)
                for name, data in ((f"{key}.png", image), (f"{key}.txt", f"sample {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"webdataset:{folder}/shard-{{000000..{SHARDS - 1:06d}}}.tar"


def captions_and_widths(records):
    return [(r["caption"], r["image"].size[0]) for r in records]


def random_width(image):  # drawn under the sample's own seed
    return image.resize((random.randint(1, 16), 4))


def stream(spec: str, workers: int = 0, rank: int = 0, world_size: int = 1, batch_size: int = 3, **kwargs):
    dataset = kwargs.pop("dataset", None) or open_dataset(spec, skip_bad=True)
    return ShardStream("retrieval", 0, dataset, "retrieval", captions_and_widths, batch_size, 7, rank, world_size,
                       workers, random_width, **kwargs)


def take(s: ShardStream, n: int) -> list:
    try:
        return [s.next_batch() for _ in range(n)]
    finally:
        s.close()


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


def test_two_ranks_see_every_sample_once_per_epoch_and_the_stream_is_endless(spec):
    everything = {f"sample s{shard}-{i}" for shard in range(SHARDS) for i in range(PER_SHARD)}
    per_rank = SHARDS * PER_SHARD // 2 // 5  # batches of 5: one epoch is 3 batches on each rank
    seen, later = [], []
    for rank in (0, 1):
        s = stream(spec, rank=rank, world_size=2, batch_size=5)
        batches = take(s, per_rank + 7)
        seen += [caption for batch in batches[:per_rank] for caption, _ in batch]
        later += [caption for batch in batches[per_rank:2 * per_rank] for caption, _ in batch]
        assert s.cursors[0][0] >= 2  # past two epochs: it loops on
    assert sorted(seen) == sorted(everything) and len(seen) == len(everything)
    assert sorted(later) == sorted(everything)  # epoch 1: the same samples, in another shard order


@pytest.mark.parametrize("workers", [2, 0])
def test_resume_repeats_the_uninterrupted_stream(spec, workers):
    straight = take(stream(spec, workers), 12)
    first = stream(spec, workers)
    head = take(first, 7)
    state = first.state_dict()
    assert state["consumed"] == 7 and len(state["cursors"]) == max(workers, 1)
    resumed = stream(spec, workers)
    resumed.load_state_dict(state)
    assert head + take(resumed, 5) == straight
    widths = {w for batch in straight for _, w in batch}
    assert len(widths) > 3  # the augmentation draws differ from sample to sample


def _gloo_rank(rank: int, spec: str, folder: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    s = stream(spec, rank=rank, world_size=2)
    take(s, 4)
    Path(folder, f"state{rank}.json").write_text(json.dumps(s.state_dict()))
    dist.destroy_process_group()


def test_state_dict_gathers_every_ranks_cursors(spec, tmp_path):
    """Only rank 0 writes the checkpoint's client state: it must hold rank 1's cursors too."""
    import torch.multiprocessing as mp
    mp.start_processes(_gloo_rank, args=(spec, str(tmp_path)), nprocs=2, start_method="fork")
    states = [json.loads((tmp_path / f"state{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] == states[1] and None not in states[0]["cursors"]
    straight = take(stream(spec, rank=1, world_size=2), 7)
    resumed = stream(spec, rank=1, world_size=2)
    resumed.load_state_dict(states[0])
    assert take(resumed, 3) == straight[4:]


def test_skipping_into_a_shard_reads_no_image(spec, monkeypatch):
    from launch.training import streaming
    url = spec.partition(":")[2].replace("{000000..000005}", "000001")
    read = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda tar, member: read.append(member.name) or
                        extract(tar, member))
    samples = list(streaming.tar_samples(url, skip=3))
    assert [s["__key__"] for s in samples] == ["s1-3", "s1-4"]
    assert set(samples[0]) == {"__key__", "__url__", "png", "txt"}
    assert read == ["s1-3.png", "s1-3.txt", "s1-4.png", "s1-4.txt"]


def test_fewer_shards_than_readers_is_an_error(spec):
    with pytest.raises(ValueError, match=r"tasks\.retrieval\.dataset: 6 shard\(s\) for 8 readers"):
        stream(spec, workers=4, world_size=2)


def test_a_corrupt_image_is_skipped_and_counted(tmp_path):
    spec = write_shards(tmp_path / "bad", corrupt="s2-3")
    dataset = open_dataset(spec, skip_bad=True)
    captions = [c for batch in take(stream(spec, dataset=dataset, batch_size=1), 29) for c, _ in batch]
    assert "sample s2-3" not in captions and len(set(captions)) == 29  # one epoch of the 29 good samples
    assert dataset.skipped["unreadable"] == 1
    dataset = open_dataset(spec, skip_bad=True)
    captions = [c for batch in take(stream(spec, 2, dataset=dataset, batch_size=4), 10) for c, _ in batch]
    assert "sample s2-3" not in captions
    assert dataset.skipped["unreadable"] >= 1  # counted in a worker, seen here


def test_another_worker_count_restarts_the_readers_with_a_note(spec, capsys):
    first = stream(spec, workers=2)
    take(first, 5)
    resumed = stream(spec, workers=0)
    resumed.load_state_dict(first.state_dict())
    note = capsys.readouterr().out
    assert "1 rank(s) x 2 reader(s), this run has 1 x 1" in note and "batches differ" in note
    assert take(resumed, 4) == take(stream(spec, workers=0), 4)  # from the start of epoch 0, the lowest recorded


RECIPE = """\
seed: 0
steps: 4
log_every: 2
workers: {workers}
model:
  image:
    backbone: internimage_t
    num_global_tokens: 2
    image_size: 32
    backbone_overrides: {{channels: 16, depths: [1, 1, 2, 1], groups: [1, 2, 4, 8], drop_path_rate: 0.0,
                          dcn_backend: reference}}
  text: {{name_or_path: builtin-tiny, mode: full}}
  decoder: {{width: 64, depth: 2, heads: 4, layer_scale_init: null}}
  embed_dim: 64
optimizer: {{warmup_steps: 1}}
tasks:
  - name: retrieval
    dataset: "{spec}"
    batch_size: 4
checkpoint: {{every_steps: 0, keep: 2}}  # at the end and at --stop-after only
"""


def test_pretraining_on_shards_resumes_exactly(spec, tmp_path):
    from launch import pretrain
    from pretrain_runs import read_log

    recipe = tmp_path / "shards.yaml"
    recipe.write_text(RECIPE.format(workers=2, spec=spec))

    def run(output, *extra):
        return pretrain.main(["--recipe", str(recipe), "--output", str(output), "--no-eval", "--no-progress",
                              *extra])

    run(tmp_path / "straight")
    assert run(tmp_path / "resumed", "--stop-after", "2")["step"] == 2
    run(tmp_path / "resumed", "--resume")
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [line["step"] for line in straight] == [1, 2, 3, 4]
    assert [(l["step"], l["loss"]) for l in resumed] == [(l["step"], l["loss"]) for l in straight]
