"""The benchmark's trace contenders (graphrunner_workloads.traces) run the steps they claim to run, and its
results keep the spread over rounds."""
import json

import pytest
import torch

from conftest import gpu
from graphrunner_workloads.bench import (changed_settings, parse_args, reported_lines, round_spread, save_results,
                                         target_header, target_lines, trace_table)
from graphrunner_workloads.decoder import DecoderConfig
from graphrunner_workloads.traces import Contenders, host_limit, round_ratios

TINY = DecoderConfig(layers=2, hidden=256, heads=4, head_dim=64, intermediate=512, vocab=1000, cache_len=64,
                     max_batch_size=16)


@gpu
def test_bare_replays_run_their_own_steps_while_the_allocator_reuses_freed_memory():
    """A bare graph reads the padded inputs it was captured on. Without the compiled contenders nothing but the
    contenders themselves keeps those inputs alive, so after memory is handed out again (filled with other valid
    ids and positions), each bare replay must still write the KV cache entries the runner writes for its step."""
    batches = [3, 5, 11]
    with torch.no_grad():
        contenders = Contenders(TINY, batches, compiled=False, gen=torch.Generator(device="cuda").manual_seed(0))
        try:
            steps = contenders.step_functions(contenders.steps)
            # Small blocks, as the padded inputs' were: freed ones would now hold ones, not the steps' values.
            reused = [torch.ones(64, dtype=torch.long, device="cuda") for _ in range(2000)]
            cache = contenders.model.k_cache
            # Not the cache as set-up left it: preparing the bare graphs ran step 0 eagerly, which wrote what
            # step 0's replays write.
            start = torch.randn_like(cache)
            for i in range(len(batches)):
                cache.copy_(start)
                steps["bare"](i)
                bare = cache.clone()
                cache.copy_(start)
                steps["run"](i)
                torch.cuda.synchronize()
                assert not torch.equal(bare, start), f"step {i}: the bare replay wrote nothing"
                torch.testing.assert_close(bare, cache, msg=lambda m: f"step {i} (batch {batches[i]}): {m}")
            del reused
        finally:
            contenders.close()


@gpu
def test_compiled_contenders_compile_nothing_inside_the_timed_trace():
    """Set-up compiles and records every size the trace's compiled contenders run, on inputs of the kind the trace
    passes: the trace's steps move no dynamo counter (run AE3: warmed up on views, reduce-overhead compiled and
    recorded again inside the first timed round, at half its usual steps/s), and their logits match eager's."""
    from torch._dynamo.utils import counters

    batches = [1, 3, 9, 16]
    with torch.no_grad():
        contenders = Contenders(TINY, batches, compiled=True, gen=torch.Generator(device="cuda").manual_seed(0))
        try:
            assert contenders.compile_error is None
            steps = contenders.step_functions(contenders.steps)
            before = {group: dict(values) for group, values in counters.items()}
            for i, batch in enumerate(batches):
                expected = contenders.model(**contenders.steps[i])
                for name in ("compile_ro", "run_compiled"):
                    out = steps[name](i)[:batch].clone()
                    # bf16 logits of differently fused kernels: within 5% of the largest logit, not garbage
                    torch.testing.assert_close(out, expected, rtol=0, atol=0.05 * expected.abs().max().item(),
                                               msg=lambda m: f"{name}, step {i} (batch {batch}): {m}")
            after = {group: dict(values) for group, values in counters.items()}
            assert after == before, "the timed steps compiled or recorded again"
        finally:
            contenders.close()


def test_ratio_spread_pairs_each_round_s_values_on_cpu():
    """A ratio's spread divides the two contenders' values of the same round, not the extremes of each: here
    run is always 1% ahead of bare although its slowest round is slower than bare's fastest."""
    spread = {"run": [101.0, 99.0, 110.0], "bare": [100.0, 98.0, 109.0]}
    low, high = round_ratios(spread, "run", "bare")
    assert low == pytest.approx(110 / 109) and high == pytest.approx(99 / 98)
    assert low > 1.0
    assert round_ratios(spread, "run", "compile_ro") is None


def test_results_json_keeps_the_spread_over_rounds_on_cpu(tmp_path):
    """The spreads reach the JSON (only keys starting with "_" stay out) and the printed targets."""
    res = {"draft_pipelined_run_vs_bare": 0.989, "draft_pipelined_run_vs_bare_rounds": (0.985, 0.992),
           "draft_trace_spread": {"draft_trace_pipelined_steps_s_run": (4800.0, 4830.0)}, "_rows": []}
    flat = save_results(tmp_path, "bench-test", "report", res, lambda r, path: None)
    saved = json.loads((tmp_path / "bench-test.json").read_text())
    assert "_rows" not in saved and saved == json.loads(json.dumps(flat))
    assert saved["draft_pipelined_run_vs_bare_rounds"] == [0.985, 0.992]
    assert round_spread(res, "draft_pipelined_run_vs_bare") == "(0.985-0.992)"
    assert round_spread(res, "capture_ratio") == ""


def test_target_lines_give_verdict_spread_and_missing_targets_on_cpu():
    res = {"draft_pipelined_run_vs_bare": 0.988, "draft_pipelined_run_vs_bare_rounds": (0.985, 0.992),
           "capture_ratio": 0.44}
    lines = target_lines(res, [("draft_pipelined_run_vs_bare", ">=", 0.99), ("capture_ratio", "<=", 0.5),
                               ("pool_ratio_desc", "<=", 1.02)])
    assert lines[0].split()[-2:] == ["MISSED", "(0.985-0.992)"]
    assert lines[1].split()[-1] == "met"
    assert lines[2].split() == ["pool_ratio_desc", "not", "run"]


def test_reported_lines_give_value_and_spread_without_a_verdict_on_cpu():
    res = {"graph_first_use_mib_L8": 2.0, "piecewise_run_vs_full_T16_L8": 0.959,
           "piecewise_run_vs_full_T16_L8_rounds": (0.958, 0.96)}
    lines = reported_lines(res, ["graph_first_use_mib_L8", "piecewise_run_vs_full_T16_L8"])
    assert lines[0] == "reported, no target:"
    assert lines[1].split() == ["graph_first_use_mib_L8", "2.000"]
    assert lines[2].split() == ["piecewise_run_vs_full_T16_L8", "0.959", "(0.958-0.960)"]


def test_a_run_away_from_the_default_settings_says_its_verdicts_are_indicative_on_cpu():
    smoke = parse_args(["--layers", "2", "--steps", "50", "--no-compile", "--name", "x", "--out", "/tmp"])
    assert changed_settings(smoke) == ["--layers 2 (8)", "--steps 50 (300)", "--no-compile"]
    assert changed_settings(parse_args(["--name", "x"])) == []
    assert target_header([]) == ["targets (median; over rounds, side by side):"]
    note = target_header(changed_settings(smoke))[1]
    assert "this run changed --layers 2 (8), --steps 50 (300), --no-compile" in note and "indicative" in note


def test_host_limit_is_compile_ro_host_time_in_run_compiled_steps_on_cpu():
    """100 us of host a compile_ro step against run_compiled's 8,000 steps/s (125 us a step): compile_ro's host
    alone would allow 0.8x; each round pairs its own two values."""
    spread = {"draft_trace_synced_host_us_compile_ro": [100.0, 90.0, 150.0],
              "draft_trace_pipelined_steps_s_run_compiled": [8000.0, 8000.0, 6000.0]}
    res = {"draft_trace_synced_host_us_compile_ro": 100.0, "draft_trace_pipelined_steps_s_run_compiled": 8000.0}
    out = host_limit(res, spread, "draft_")
    assert out["draft_run_compiled_vs_compile_ro_host_limit"] == pytest.approx(0.8)
    assert out["draft_run_compiled_vs_compile_ro_host_limit_rounds"] == pytest.approx((0.72, 0.9))
    assert host_limit({}, {}, "draft_") == {}


def test_trace_table_prints_each_contender_s_synchronised_host_time_on_cpu():
    res = {"_draft_preset": DecoderConfig(layers=2, cache_len=256, max_batch_size=128),
           "draft_trace_synced_host_us_compile_ro": 101.5,
           "draft_trace_spread": {"draft_trace_synced_host_us_compile_ro": (98.25, 140.0)}}
    lines = trace_table(res, "draft_")
    header = lines[1]
    assert "synced host us" in header
    row = next(line for line in lines if line.split()[0] == "compile_ro")
    cells = [header.index(t) + len(t) for t in ("pipelined steps/s", "synced steps/s", "synced host us")]
    assert row[cells[1]:cells[2]].strip() == "101.5 (98.2-140.0)"
    assert row[:cells[1]].split() == ["compile_ro", "-", "-"]
