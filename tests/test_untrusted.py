"""Untrusted model files and arguments: fuzzed GGUF files, HF directories and checkpoints are refused with
our error or load as sound models; the CLI answers a damaged file with one line; every API argument either
works or raises an error naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxdecode as jd
from jaxdecode.io.validate import ModelFileError

from cli_output import stderr_lines
from tiny import tiny_model

HERE = Path(__file__).parent
MUTANTS = 200  # per kind (the floor)


@pytest.fixture(scope="module")
def kept(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("refused-mutants")


@pytest.fixture(scope="module")
def reports(kept) -> dict[str, dict]:
    """tests/fuzz.py for every kind with a fixed seed, each in its own process (it sets an address-space
    limit); the GGUF cases split over two processes. They run side by side on the machine's cores."""
    runs = {"gguf": ["--part", "0/2"], "gguf ": ["--part", "1/2"], "hf": [], "checkpoint": []}
    processes = {
        name: subprocess.Popen(
            [
                sys.executable,
                str(HERE / "fuzz.py"),
                name.strip(),
                str(MUTANTS),
                "20261201",
                "--keep",
                str(kept),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        for name, extra in runs.items()
    }
    merged: dict[str, dict] = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
        report = json.loads(out)
        kind = merged.setdefault(name.strip(), {"counts": {}, "examples": {}, "stalls": []})
        kind["stalls"].extend(report["stalls"])
        for outcome, n in report["counts"].items():
            kind["counts"][outcome] = kind["counts"].get(outcome, 0) + n
            kind["examples"].setdefault(outcome, []).extend(report["examples"][outcome])
    return merged


@pytest.mark.parametrize("kind", ["gguf", "hf", "checkpoint"])
def test_fuzzed_model_files_are_refused_or_sound(kind, reports):
    """Each mutant, under a per-case timeout and an address-space limit, is refused with a ModelFileError
    naming the file, or loads as a model whose forward pass runs: no other exception, no hang, no memory
    blow-up, no file outside the directory, nothing structurally broken accepted."""
    report = reports[kind]
    counts = report["counts"]
    print(f"\n{kind}: {counts}, stalled once: {report['stalls']}")
    assert sum(counts.values()) == MUTANTS
    bad = {k: v for k, v in counts.items() if k not in ("refused", "ok")}
    assert not bad, json.dumps({k: report["examples"][k] for k in bad}, indent=1)
    assert counts.get("refused", 0) >= MUTANTS // 2  # the mutations do hit the checks
    # A stall is a case over the timeout once that finished when run again (a busy machine); more than a
    # few would be something slow in the loaders, not the machine.
    assert len(report["stalls"]) <= 3, report["stalls"]


def test_cli_answers_refused_mutants_with_one_line(kept, reports):
    """A sample of the refused mutants through `jaxdecode generate`: one line on stderr, exit status 2."""
    samples = {path.name.split("-")[0]: path for path in sorted(kept.iterdir(), reverse=True)}  # one per kind
    assert set(samples) == {"gguf", "hf", "checkpoint"}, sorted(kept.iterdir())
    for path in samples.values():
        result = subprocess.run(
            [sys.executable, "-m", "jaxdecode.cli", "generate", "--model", str(path), "--prompt", "hi"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = stderr_lines(result.stderr)
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith("jaxdecode: error:") and str(path) in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_cli_internal_error_is_one_line_with_the_way_to_a_traceback(tmp_path, monkeypatch):
    from jaxdecode import cli

    def boom(args):
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(cli, "_eval_ppl", boom)
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert cli.main(["eval-ppl", "--text-file", str(text)]) == cli.EXIT_INTERNAL
    with pytest.raises(RuntimeError):
        cli.main(["eval-ppl", "--text-file", str(text), "--debug"])


def test_a_manifest_that_covers_nothing_is_refused(tmp_path):
    """`{}` as the manifest used to switch every check off; now the manifest must cover every file."""
    directory = tmp_path / "ck"
    jd.save(tiny_model(), directory)
    version = directory / (directory / "LATEST").read_text()
    (version / "MANIFEST.json").write_text("{}")
    with pytest.raises(jd.CheckpointError, match="does not cover jaxdecode.json"):
        jd.load(directory)


def test_model_file_error_carries_the_file_and_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": "no"}))
    with pytest.raises(ModelFileError) as info:
        jd.load(tmp_path)
    assert info.value.path == str(tmp_path / "config.json")
    assert "tie_word_embeddings must be true, false or null, got 'no'" in str(info.value)


def test_index_files_may_link_into_the_hub_cache_but_nowhere_else(tmp_path):
    """huggingface_hub's cache keeps a snapshot's files as links into the repository's blobs/; a shard
    that links anywhere else is refused."""
    from fuzz import make_hf_dir

    source = tmp_path / "source"
    make_hf_dir(source)
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    model = jd.load(snapshot)
    assert model.config.num_layers == 2
    shard = snapshot / "model-00001-of-00002.safetensors"
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(elsewhere)
    with pytest.raises(ModelFileError, match="resolves outside"):
        jd.load(snapshot)


# ------------------------------------------------------------------------------------------------
# API arguments: every input works or raises ValueError / TypeError naming the argument.


@pytest.fixture(scope="module")
def model():
    return tiny_model()


_ANY = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.lists(st.integers(min_value=-3, max_value=70), max_size=3),
    st.builds(np.int64, st.integers(min_value=-(2**40), max_value=2**40)),
    st.builds(lambda xs: np.asarray(xs, np.int32), st.lists(st.integers(0, 63), min_size=1, max_size=3)),
)
_SMALL_INT = st.one_of(st.integers(min_value=1, max_value=4), st.builds(np.int32, st.integers(1, 4)))


def _assert_names(error: Exception, *names: str) -> None:
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    assert any(n in str(error) for n in names), f"{error!r} names none of {names}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompts=st.one_of(_ANY, st.lists(st.lists(st.integers(-2, 66), max_size=3), max_size=2)),
    max_new_tokens=st.one_of(_SMALL_INT, _ANY),
    seed=st.one_of(st.integers(0, 3), _ANY),
    stop_ids=st.one_of(st.none(), _ANY),
)
def test_generate_arguments_work_or_are_named(model, prompts, max_new_tokens, seed, stop_ids):
    try:
        out = jd.generate(model, prompts, max_new_tokens=max_new_tokens, seed=seed, stop_ids=stop_ids)
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions
        _assert_names(e, "prompt", "max_new_tokens", "seed", "stop_ids", "token", "tokenizer")
        return
    assert all(0 <= t < model.config.vocab_size for row in out.tokens for t in row)


@settings(max_examples=60, deadline=None)
@given(
    temperature=st.one_of(st.floats(0, 2), _ANY),
    top_k=st.one_of(st.integers(0, 70), _ANY),
    top_p=st.one_of(st.floats(0.1, 1), _ANY),
    min_p=st.one_of(st.floats(0, 0.9), _ANY),
)
def test_sampling_settings_work_or_are_named(temperature, top_k, top_p, min_p):
    try:
        jd.Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    except Exception as e:  # noqa: BLE001
        _assert_names(e, "temperature", "top_k", "top_p", "min_p")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.one_of(_ANY, st.lists(st.lists(st.integers(-2, 66), max_size=3), max_size=2)))
def test_forward_and_perplexity_arguments_work_or_are_named(model, tokens):
    for call in (lambda: jd.forward(model, tokens), lambda: jd.perplexity(model, tokens)):
        try:
            out = call()
        except Exception as e:  # noqa: BLE001
            _assert_names(e, "tokens", "token_ids", "need at least 2 tokens")
            continue
        assert np.all(np.isfinite(np.asarray(out[0] if isinstance(out, tuple) else out)))


def test_numpy_prompts_and_settings_are_accepted(model):
    reference = jd.generate(model, [[1, 2, 3]], max_new_tokens=3, stop_ids=[5])
    from_numpy = jd.generate(
        model, np.asarray([[1, 2, 3]], np.int64), max_new_tokens=np.int32(3), seed=np.int64(0), stop_ids=np.array([5])
    )
    assert from_numpy.tokens == reference.tokens
    assert jd.Sampling(top_k=np.int64(5), temperature=np.float32(0.5)).top_k == 5


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: jd.forward(m, [[]]), "every row needs the same number"),
        (lambda m: jd.forward(m, [[1, 70]]), "token id 70 is outside the vocabulary"),
        (lambda m: jd.forward(m, [[1, -1]]), "token id -1 is outside the vocabulary"),
        (lambda m: jd.forward(m, [[1.7, 2]]), "token ids must be integers, got float 1.7"),
        (lambda m: jd.generate(m, b"\x01\x02"), "prompts must be text, token ids or a list of them, got bytes"),
        (lambda m: jd.generate(m, [[1]], seed=2**64), "seed must be in"),
        (lambda m: jd.generate(m, [[1]], stop_ids=[2**40]), "stop_ids: token id 1099511627776 is outside"),
        (lambda m: jd.Sampling(top_k=2**40), "top_k must be at most 2147483647"),
        (lambda m: list(jd.stream(m, [[1], [2]])), "stream takes one prompt, got 2"),
    ],
)
def test_bad_arguments_are_named(model, call, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(")):
        call(model)
