"""LLM in a flash (`jaxdecode/flash.py`, `predictors.py`): flash checkpoints, offloaded decoding against the
resident model, the neuron cache's bookkeeping, predictors, and refusals of bad budgets and damaged files."""

from __future__ import annotations

import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode import flash, predictors
from jaxdecode.cli import main

from tiny import TINY, quantized, tiny_model

PROMPTS = [[5, 17, 33, 2, 9]]
# The tiny model's FFN: 2 layers x 48 neurons x 512-byte records = 48 KB (24.6 KB a layer); resident part
# 33.6 KB; the neuron strategy's scratch: 48 records (24.6 KB).
RESIDENT_MB, LAYER_MB = 0.0336, 0.0246
SMALL_BUDGET_MB = RESIDENT_MB + LAYER_MB + 0.026  # caches of 25 of the 48 neurons of each layer
ONE_LAYER_MB = RESIDENT_MB + 2.5 * LAYER_MB  # naive: the scratch and one of the two layers kept


@pytest.fixture(scope="module")
def tiny_flash(tmp_path_factory):
    model = tiny_model()
    directory = tmp_path_factory.mktemp("flash") / "tiny"
    jd.save(model, directory, flash=True)
    return model, directory


def _layer_records(directory, layer: int) -> np.ndarray:
    version = jd.checkpoint.version_dir(directory)
    return flash.read_layer(version, flash.read_bundles(version, TINY), layer)


def _masked_mlp(params, layer: int, x: np.ndarray, active: np.ndarray | None) -> np.ndarray:
    """A float64 reference: the layer's SwiGLU MLP over the neurons `active` `[N, F]` (None: all)."""
    mlp = params[f"layer_{layer}"]["mlp"]
    gate, up, down = (np.asarray(mlp[k]["weight"], np.float64) for k in ("gate", "up", "down"))
    g = x.astype(np.float64) @ gate
    hidden = g / (1 + np.exp(-g)) * (x.astype(np.float64) @ up)
    if active is not None:
        hidden = hidden * active
    return hidden @ down


def test_flash_checkpoint_loads_whole_as_the_model(tiny_flash):
    model, directory = tiny_flash
    version = jd.checkpoint.version_dir(directory)
    assert sorted(p.name for p in (version / "flash").iterdir()) == ["bundles.json", "layer_0.bin", "layer_1.bin"]
    loaded = jd.load(directory)
    for i in range(TINY.num_layers):
        for name in ("gate", "up", "down"):
            np.testing.assert_array_equal(
                np.asarray(loaded.params[f"layer_{i}"]["mlp"][name]["weight"]),
                np.asarray(model.params[f"layer_{i}"]["mlp"][name]["weight"]),
            )
    assert (
        jd.generate(loaded, PROMPTS, max_new_tokens=12).tokens == jd.generate(model, PROMPTS, max_new_tokens=12).tokens
    )


@pytest.mark.parametrize(
    "offload",
    [
        jd.Offload(1.0, predictor="oracle", fraction=1.0),  # everything fits
        jd.Offload(SMALL_BUDGET_MB, predictor="oracle", fraction=1.0, window=2),  # eviction + scratch overflow
        jd.Offload(SMALL_BUDGET_MB, predictor="oracle", fraction=1.0, window=None),
        jd.Offload(ONE_LAYER_MB, reads="matrices"),
        jd.Offload(ONE_LAYER_MB - LAYER_MB, reads="mmap"),  # no scratch: the mapping is the buffer
    ],
    ids=["fits", "window", "lru", "naive", "mmap"],
)
def test_offloaded_decoding_matches_the_resident_model(tiny_flash, offload):
    model, directory = tiny_flash
    offloaded = jd.load(directory, offload=offload)
    expected = jd.generate(model, PROMPTS * 2, max_new_tokens=16)
    result = jd.generate(offloaded, PROMPTS * 2, max_new_tokens=16)
    assert result.tokens == expected.tokens
    stats = result.offload
    assert 0.0 <= stats["hit_rate"] <= 1.0 and stats["resident_mb"] > 0
    if offload.reads != "neurons":  # one layer of two kept: the other's whole records read every token
        assert stats["hit_rate"] == 0.5
        assert stats["bytes_read_per_token"] == TINY.ffn_dim * 512 / 2  # per token: per row of the batch of 2
    elif offload.memory_budget_mb == SMALL_BUDGET_MB:  # the budget holds about half: decoding must read
        assert stats["bytes_read_per_token"] > 0 and stats["hit_rate"] < 1.0
    else:
        assert stats["bytes_read_per_token"] == 0 and stats["hit_rate"] == 1.0
    logits = np.asarray(jd.forward(offloaded, np.asarray(PROMPTS)))
    np.testing.assert_allclose(logits, np.asarray(jd.forward(model, np.asarray(PROMPTS))), rtol=2e-5, atol=2e-4)


def test_neuron_cache_bookkeeping_and_the_sparse_mlp(tiny_flash):
    """Oracle at half the neurons, a cache of ~a third of them, window 2: after each call the cache holds
    exactly the records of the neurons it says (swap-with-last kept the maps consistent), never more than
    its capacity, and the output is the MLP over each row's true top half (float64 reference)."""
    model, directory = tiny_flash
    budget = RESIDENT_MB + LAYER_MB + 0.0165  # caches of 16 neurons: a third of each layer's
    offloaded = jd.load(directory, offload=jd.Offload(budget, predictor="oracle", fraction=0.5, window=2))
    store = offloaded.offload
    layer = store.layers[1]
    records = _layer_records(directory, 1)
    rng = np.random.default_rng(0)
    f = TINY.ffn_dim
    keep = f // 2
    for step in range(12):
        x = rng.normal(size=(1, 2, TINY.d_model)).astype(np.float32) * (3.0 if step % 3 else 0.3)
        out = layer.ffn(x)
        rows = x.reshape(-1, TINY.d_model)
        mlp = model.params["layer_1"]["mlp"]
        g = rows.astype(np.float64) @ np.asarray(mlp["gate"]["weight"], np.float64)
        truth = np.abs(g / (1 + np.exp(-g)) * (rows.astype(np.float64) @ np.asarray(mlp["up"]["weight"], np.float64)))
        active = np.zeros_like(truth, bool)
        np.put_along_axis(active, np.argsort(-truth, axis=1)[:, :keep], True, axis=1)
        np.testing.assert_allclose(out.reshape(-1, TINY.d_model), _masked_mlp(model.params, 1, rows, active), atol=1e-3)
        assert 0 < layer.used <= layer.capacity == 16
        held = layer.neuron_of[: layer.used]
        assert len(set(held.tolist())) == layer.used
        np.testing.assert_array_equal(layer.slot_of[held], np.arange(layer.used))
        assert (layer.slot_of >= 0).sum() == layer.used
        np.testing.assert_array_equal(layer.cache.rows[: layer.used], records[held])
        assert (layer.last_used[: layer.used] > layer.step - 2).all()  # the window evicted the older ones


def test_predictors_train_save_and_drive_decoding(tiny_flash, tmp_path):
    model, directory = tiny_flash
    target = tmp_path / "with-predictors"
    jd.save(model, target, flash=True)
    with pytest.raises(ValueError, match="no trained predictors.*train-predictors"):
        jd.load(target, offload=jd.Offload(1.0))
    ids = np.random.default_rng(1).integers(0, TINY.vocab_size, 1024).tolist()
    settings = predictors.Training(rank=8, fraction=0.5, steps=30, max_tokens=1024)
    layers, report = predictors.train(model, ids, settings)
    assert len(report["precision"]) == TINY.num_layers and all(0 < p <= 1 for p in report["precision"])
    assert all(0 < r <= 1 for r in report["recall"]) and report["held_out_tokens"] > 0
    predictors.save(target, layers, report)
    assert len(list(target.glob("v-*"))) == 1  # the new version replaced the old one
    offloaded = jd.load(target, offload=jd.Offload(1.0))
    assert offloaded.offload.fraction == 0.5
    result = jd.generate(offloaded, PROMPTS, max_new_tokens=8)
    assert len(result.tokens[0]) == 8 and result.offload["ffn_fraction_computed"] == pytest.approx(0.5)
    saved, _ = flash.read_predictors(jd.checkpoint.version_dir(target), TINY)
    np.testing.assert_array_equal(saved[1]["b"], layers[1]["b"])


def test_bad_budgets_sources_and_damaged_bundles_are_refused(tiny_flash, tmp_path):
    model, directory = tiny_flash
    with pytest.raises(
        ValueError, match=r"cannot hold the resident part of .*tiny \(0\.03341 MB .*the minimum is 0\.05901 MB"
    ):
        jd.load(directory, offload=jd.Offload(0.01, predictor="oracle"))
    with pytest.raises(ValueError, match="memory_budget_mb must be a positive"):
        jd.Offload(0)
    with pytest.raises(ValueError, match="window must be"):
        jd.Offload(1.0, window=0)
    plain = tmp_path / "plain"
    jd.save(model, plain)
    with pytest.raises(ValueError, match="not one.*--flash"):
        jd.load(plain, offload=jd.Offload(1.0))
    damaged = tmp_path / "damaged"
    jd.save(model, damaged, flash=True)
    bundle = jd.checkpoint.version_dir(damaged) / "flash" / "layer_1.bin"
    data = bytearray(bundle.read_bytes())
    data[100] ^= 0xFF
    bundle.write_bytes(bytes(data))
    with pytest.raises(jd.CheckpointError, match=r"layer_1\.bin.*does not match its checksum"):
        jd.load(damaged, offload=jd.Offload(1.0, predictor="oracle"))
    offloaded = jd.load(directory, offload=jd.Offload(1.0, predictor="oracle", fraction=1.0))
    with pytest.raises(ValueError, match="decodes plainly"):
        jd.generate(offloaded, PROMPTS, speculative=jd.SelfSpeculative())
    with pytest.raises(ValueError, match="already"):
        jd.save(offloaded, tmp_path / "again")


def test_int8_bundles_compute_the_int8_model(tmp_path):
    """`--flash --quant int8`: records of int8 values with their rows' scales (down's per-output scales
    beside, resident) load whole as the same QuantizedWeights, and offloaded (cache of about half, window
    eviction and scratch overflow; naive; mmap) give the int8 model's tokens and logits."""
    model = quantized(tiny_model(), "int8")
    directory = tmp_path / "int8"
    jd.save(model, directory, flash=True)
    version = jd.checkpoint.version_dir(directory)
    bundles = flash.read_bundles(version, TINY)
    assert (bundles.dtype, bundles.record_bytes) == ("int8", 512)  # 3 x 32 int8 + 2 float32 scales, padded
    whole = jd.load(directory)
    for i in range(TINY.num_layers):
        for name in ("gate", "up", "down"):
            saved, loaded = (m.params[f"layer_{i}"]["mlp"][name]["weight"] for m in (model, whole))
            assert (loaded.kind, loaded.shape) == ("int8", saved.shape)
            np.testing.assert_array_equal(np.asarray(loaded.values), np.asarray(saved.values))
            np.testing.assert_array_equal(np.asarray(loaded.scales), np.asarray(saved.scales))
    expected = jd.generate(model, PROMPTS * 2, max_new_tokens=16)
    logits = np.asarray(jd.forward(model, np.asarray(PROMPTS)))
    half = RESIDENT_MB / 3 + LAYER_MB + 0.026  # int8 embeddings and attention: about a third of float32's
    for offload in (
        jd.Offload(half, predictor="oracle", fraction=1.0, window=2),
        jd.Offload(half, reads="matrices"),
        jd.Offload(half - LAYER_MB, reads="mmap"),
    ):
        offloaded = jd.load(directory, offload=offload)
        result = jd.generate(offloaded, PROMPTS * 2, max_new_tokens=16)
        assert result.tokens == expected.tokens, offload
        assert result.offload["bytes_read_per_token"] > 0 and result.offload["hit_rate"] < 1, offload
        np.testing.assert_allclose(np.asarray(jd.forward(offloaded, np.asarray(PROMPTS))), logits, rtol=2e-5, atol=2e-4)


def test_cli_refuses_flash_with_quantization_and_predictors_for_a_plain_checkpoint(tiny_flash, tmp_path, capsys):
    model, _ = tiny_flash
    plain = tmp_path / "plain"
    jd.save(model, plain)
    text = tmp_path / "text.txt"
    text.write_text("some text")
    assert main(["convert", "smollm2-135m", str(tmp_path / "out"), "--flash", "--quant", "int4"]) == 2
    assert "--flash writes float32 or int8 bundles" in capsys.readouterr().err
    assert main(["train-predictors", str(plain), "--text-file", str(text)]) == 2
    assert "not a flash checkpoint" in capsys.readouterr().err


def test_smollm2_flash_checkpoint_at_the_issues_budget(tmp_path, capsys):
    """SmolLM2-135M float32 converted with `convert --flash`, run in 380 MB of weights (219.6 MB resident,
    the rest a cache of about half the FFN): every neuron computed (fraction 1, the oracle's machinery),
    the greedy tokens are the resident model's, and the cache really is half: decoding reads storage."""
    directory = tmp_path / "smollm2-flash"
    assert main(["convert", "smollm2-135m", str(directory), "--flash"]) == 0
    capsys.readouterr()
    resident = jd.load("smollm2-135m")
    expected = jd.generate(resident, "The capital of France is", max_new_tokens=12)
    del resident
    offloaded = jd.load(directory, offload=jd.Offload(380, predictor="oracle", fraction=1.0))
    result = jd.generate(offloaded, "The capital of France is", max_new_tokens=12)
    assert result.tokens == expected.tokens and result.text[0].startswith(" Paris.")
    stats = result.offload
    assert stats["resident_mb"] == pytest.approx(219.6, abs=0.5)
    assert 150 < stats["cache_mb"] < 161 and stats["read_mode"] in ("O_DIRECT", flash._Reader.BUFFERED)
    assert 0.4 < stats["hit_rate"] < 0.6 and 0.4 < stats["ffn_fraction_read"] < 0.6
    with pytest.raises(ValueError, match=r"the minimum is 22\d\.\d+ MB"):
        jd.load(directory, offload=jd.Offload(200, predictor="oracle"))
