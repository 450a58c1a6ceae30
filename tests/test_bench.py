"""
bench.py: tiny runs give valid JSON, the two models it races compute the same thing, the memory
plan holds against the bytes kept, and a section that fails is reported without losing the others.
One small subprocess per group of sections, so none runs long on a busy machine.

    python -m pytest -q tests/test_bench.py
"""
import json

import pytest
import tiktoken

from hardware import cpu_has_bf16
from conftest import SHAKESPEARE, assert_user_error, python

TINY = ["--n-layer=1", "--n-embd=32", "--n-head=2", "--n-kv-head=1", "--vocab-size=256", "--batch-size=2",
        "--seq-len=16", "--steps=1", "--repeats=1", "--decode-new-tokens=8"]

pytestmark = pytest.mark.usefixtures("corpus")  # these tests read Tiny Shakespeare

def bench(*args, **kwargs):
    result = python("bench.py", *TINY, *args, **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)

@pytest.mark.slow
def test_the_two_models_agree_and_the_limits_are_fractions():
    report = bench("--sections=train,decode,limit", "--decode-batches=1,2")
    assert report["train_eager"]["first_loss"]["ours"] == pytest.approx(report["train_eager"]["first_loss"]["hf"],
                                                                         abs=1e-5)
    one, two = report["decode"]["batch_1"], report["decode"]["batch_2"]  # --decode-batches=1,2
    assert one["same_tokens_as_hf"] and one["same_tokens_as_no_cache"] and one["same_tokens_compiled"]
    assert two["same_tokens_as_hf"] and two["same_tokens_compiled"]
    assert 0 < one["ours_bandwidth_fraction"] < 1 and one["ours_compiled_compile_s"] > 0
    bf16 = "ours_compiled_bf16_weights"  # the steps alone stream faster than the whole generate, prefill and all
    assert 0 < one[f"{bf16}_bandwidth_fraction"] < one[f"{bf16}_step_bandwidth_fraction"]
    assert 0 < report["limit"]["float32"]["fraction_of_peak"] < 1.5  # a tiny model: far from the peak

@pytest.mark.slow
def test_the_memory_plan_holds_against_the_bytes_kept():
    report = bench("--sections=memory")
    for variant in ("plain", "checkpointing", "chunked_loss", "both", "manual_attention"):  # plan within 10 %
        assert 0.9 < report["memory"][variant]["measured_over_planned"] < 1.1, report["memory"]
    assert report["memory"]["both"]["saved_mb"] < report["memory"]["plain"]["saved_mb"] / 2

@pytest.mark.slow
def test_tokenizing_counts_every_token_and_a_failing_section_leaves_the_rest(tmp_path):
    text = tmp_path / "act.txt"  # an act's worth: the count is the point, not the speed
    text.write_text(SHAKESPEARE.read_text()[:100_000])
    report = bench("--sections=tokenize", f"--text-file={text}", "--tokenize-copies=1")
    paragraphs = [p for p in text.read_text().split("\n\n") if p.strip()]  # bench's documents
    enc = tiktoken.get_encoding("r50k_base")
    assert report["tokenize"]["tokens"] == sum(len(enc.encode_ordinary(p)) + 1 for p in paragraphs)  # + eot each
    assert report["tokenize"]["prepare_tok_s"] > 0 and report["tokenize"]["ratio"] > 0
    # Offline without tiktoken's cache the tokenize section fails, and says why; the rest stands.
    report = bench("--sections=decode,tokenize", "--decode-batches=1", f"--text-file={text}",
                   env={"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1",
                        "NO_PROXY": "*", "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert "TIKTOKEN_CACHE_DIR" in report["tokenize"]["failed"] and report["decode"]["batch_1"]["ours_tok_s"] > 0
    assert_user_error(python("bench.py", "--sections=everything"), "--sections=everything")

@pytest.mark.slow
def test_time_to_loss_reads_the_runs_it_starts():
    # bf16 only where this CPU multiplies it natively: emulated, 20 steps take minutes (chosen by
    # capability, like train.py's dtype)
    variants = ["fp32-adamw", "bf16-muon" if cpu_has_bf16() else "fp32-muon"]
    report = bench("--sections=time_to_loss", f"--text-file={SHAKESPEARE}", "--ttl-steps=20", "--ttl-target=5.3",
                   f"--ttl-variants={','.join(variants)}")
    for variant in variants:  # 20 steps of nanoGPT's config: from 5.55 to below 5.3
        run = report["time_to_loss"][variant]
        assert 0 < run["steps_to_target"] <= 20 and run["final_val_loss"] < 5.3
