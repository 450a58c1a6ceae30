"""
model.py against independent references: Hugging Face's LlamaForCausalLM, full forwards without
the KV cache, naive sampling, hand counts. Tiny models on the CPU; no subprocesses.

    python -m pytest -q test_model.py
"""
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))  # the tests' shared helpers: tests/conftest.py
from conftest import full_logits, random_model, tiny_config  # noqa: E402
from hf import from_hf, to_hf  # noqa: E402
from model import KVCache, Transformer, apply_rope, rope_tables, sample_next  # noqa: E402

# -----------------------------------------------------------------------------
# model.py

def hf_llama(hf_config):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**hf_config)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).eval()

@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_logits_match_hf_llama(tie, n_kv_head, theta):
    model = random_model(n_kv_head=n_kv_head, rope_theta=theta, tie_embeddings=tie)
    hf_state, hf_config = to_hf(model.state_dict(), model.config)
    hf = hf_llama(hf_config)
    assert hf.config.rope_parameters["rope_theta"] == theta
    hf.load_state_dict(hf_state, strict=not tie)  # tied: lm_head comes from embed_tokens
    assert torch.equal(hf.lm_head.weight, model.lm_head.weight)
    idx = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = full_logits(model, idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-5

    # The reverse: a model that HF initialised, imported, gives HF's logits ...
    torch.manual_seed(2)
    hf2 = hf_llama(hf_config)
    state, cfg = from_hf(hf2.state_dict(), hf2.config.to_dict())
    assert replace(cfg, multiple_of=16) == model.config  # multiple_of only derives ffn_hidden
    imported = Transformer(cfg).eval()
    imported.load_state_dict(state)
    with torch.no_grad():
        assert (full_logits(imported, idx) - hf2(idx).logits).abs().max().item() <= 1e-5
    # ... and our export imported back is the very same model.
    state, cfg = from_hf(hf_state, hf_config)
    back = Transformer(cfg).eval()
    back.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(full_logits(back, idx), ours)

def test_causality():
    model = random_model()
    idx = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    t = 17
    changed[:, t] = (idx[:, t] + 1) % 96
    with torch.no_grad():
        a, b = full_logits(model, idx), full_logits(model, changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees it

def test_kv_cache_decode_equals_full_forward():
    model = random_model(n_kv_head=2)  # GQA
    prompt = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert out.shape == (2, 29)
    # Reference: greedy decoding with a full forward over the whole sequence at every step.
    ref = prompt
    with torch.no_grad():
        for _ in range(20):
            ref = torch.cat([ref, full_logits(model, ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)

    # Step by step: prefill, one-token steps, and a 5-token chunk after cached positions (the
    # shifted causal mask); each step's logits equal the full forward's at those positions.
    with torch.no_grad():
        full = full_logits(model, ref)
        for layer in model.layers:
            layer.self_attn.cache = KVCache(max_len=29)
        got = [model(ref[:, :9], targets=torch.zeros_like(ref[:, :9]))[0]]
        for t in range(9, 24):
            got.append(model(ref[:, t:t + 1], pos=t)[0])
        got.append(model(ref[:, 24:], targets=torch.zeros_like(ref[:, 24:]), pos=24)[0])
        for layer in model.layers:
            layer.self_attn.cache = None
    assert (torch.cat(got, dim=1) - full).abs().max().item() <= 1e-5

def test_generate_past_the_context_and_eos():
    model = random_model(max_seq_len=16)
    prompt = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, max_new_tokens=40, temperature=0)
    assert out.shape == (2, 50)  # the cache restarted from the recent half, twice or more
    with torch.no_grad():  # the first 6 new tokens fit in the context: plain greedy
        ref = prompt
        for _ in range(6):
            ref = torch.cat([ref, full_logits(model, ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out[:, :16], ref)
    # eos: row 0 is known to produce token `eos` at step 2; every row stops at its first eos
    # and pads with eos until all rows are done.
    eos = int(out[0, 12])
    first = [int((row[10:] == eos).nonzero()[0]) if (row[10:] == eos).any() else None for row in out]
    stopped = model.generate(prompt, max_new_tokens=40, temperature=0, eos_id=eos)
    ends = [40 if f is None else f + 1 for f in first]
    assert stopped.size(1) == 10 + max(ends)
    for row, end in enumerate(ends):
        assert torch.equal(stopped[row, :10 + end], out[row, :10 + end])
        assert (stopped[row, 10 + end:] == eos).all()

def test_rope_scores_depend_only_on_relative_position():
    D = 16
    cos, sin = rope_tables(D, 128, 10000.0)
    q, k = torch.randn(2, 1, 1, 1, D).unbind(0)  # (1, 1, 1, D) each

    def score(m, n):  # <rope(q at m), rope(k at n)>
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()

    for m, n in [(5, 2), (40, 3), (9, 9)]:
        for shift in (1, 17, 80):
            assert abs(score(m, n) - score(m + shift, n + shift)) < 1e-4
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and it does depend on the offset
    assert torch.allclose(apply_rope(q, cos[:1], sin[:1]), q)  # position 0 is the identity

def test_loss_at_init_and_overfitting_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=256))
    idx = torch.randint(0, 256, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(256)) < 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(50):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5

def test_ignore_index_and_inference_logits():
    model = random_model()
    idx = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    targets[:, -4:] = -1
    logits, loss = model(idx, targets)
    ref = F.cross_entropy(logits[:, :-4].reshape(-1, 96), targets[:, :-4].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6)
    last, no_loss = model(idx)
    assert no_loss is None and last.shape == (2, 1, 96)
    assert torch.allclose(last[:, 0], logits[:, -1], atol=1e-6)

@pytest.mark.parametrize("pos_emb", ["rope", "learned", "none"])
@pytest.mark.parametrize("mlp", ["swiglu", "geglu", "gelu", "silu"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "none"])
def test_ablations_run_forward_and_backward(pos_emb, mlp, norm):
    torch.manual_seed(0)
    model = Transformer(tiny_config(pos_emb=pos_emb, mlp=mlp, norm=norm, dropout=0.1,
                                    norm_position="post" if mlp == "geglu" else "pre"))
    idx = torch.randint(0, 96, (2, 16))
    block, x = model.layers[0], torch.randn(2, 5, 32)
    act = {"gelu": F.gelu, "silu": F.silu}.get(mlp)
    if act:  # no gate: down(act(up x)), 4C wide
        assert block.mlp.up_proj.out_features == 128 and not hasattr(block.mlp, "gate_proj")
        assert torch.allclose(block.mlp(x), block.mlp.down_proj(act(block.mlp.up_proj(x))), atol=1e-6)
    if norm == "none":
        assert torch.equal(block.input_layernorm(x), x) and torch.equal(model.norm(x), x)
    _, loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.generate(idx[:, :4], 6, temperature=0).shape == (2, 10)
    if (pos_emb, mlp, norm, model.config.norm_position) != ("rope", "swiglu", "rmsnorm", "pre"):
        with pytest.raises(ValueError, match="only Llama exports"):
            to_hf(model.state_dict(), model.config)

# --- The seeds' ablations, checked by hand ------------------------------------------------------------
def test_geglu_is_a_gelu_gated_mlp_of_swiglus_size():
    model = random_model(mlp="geglu")
    mlp, x = model.layers[0].mlp, torch.randn(2, 5, 32)
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # (F, C), (F, C), (C, F)
    gate = x @ wg.T
    gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))  # GELU's definition, the exact one
    assert torch.allclose(mlp(x), (gelu * (x @ wu.T)) @ wd.T, atol=1e-6)
    # the width rule of SwiGLU (2/3 of 4C, rounded up), so the two gated MLPs and the two plain ones
    # (4C, two matrices) have the same parameters to within the rounding
    # (n_embd 96: 2/3 of 4C is 256 exactly, so the four are equal to the parameter)
    sizes = {mlp: Transformer(tiny_config(mlp=mlp, n_embd=96, multiple_of=8)).num_params(embeddings=False)
             for mlp in ("swiglu", "geglu", "gelu", "silu")}
    assert len(set(sizes.values())) == 1, sizes

def test_post_norm_normalizes_after_each_residual_add():
    model = random_model(norm_position="post", n_layer=2)
    block, x = model.layers[0], torch.randn(2, 6, 32)
    cos, sin = model.rope_cos[:6], model.rope_sin[:6]

    def rms(t, w):  # RMSNorm by hand: t / sqrt(mean(t^2) + eps) * w
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    h = rms(x + block.self_attn(x, cos, sin, 0), block.input_layernorm.weight)  # attention reads x itself
    expected = rms(h + block.mlp(h), block.post_attention_layernorm.weight)
    assert torch.allclose(block(x, cos, sin, 0), expected, atol=1e-5)
    # the last block ends with a norm: no second one before the head
    assert isinstance(model.norm, torch.nn.Identity) and "norm.weight" not in model.state_dict()
    idx = torch.randint(0, 96, (2, 8))
    h = model.embed_tokens(idx)
    for layer in model.layers:
        h = layer(h, model.rope_cos[:8], model.rope_sin[:8], 0)
    assert torch.allclose(full_logits(model, idx), model.lm_head(h), atol=1e-5)

@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_written_out_equals_sdpa_with_gradients_and_the_cache(n_kv_head):
    fused = random_model(n_kv_head=n_kv_head)
    manual = random_model(n_kv_head=n_kv_head, attention="manual")
    manual.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    for model in (fused, manual):
        model.zero_grad()
        model(idx, idx)[1].backward()
    assert (full_logits(fused, idx) - full_logits(manual, idx)).abs().max() <= 1e-5
    for (name, a), b in zip(fused.named_parameters(), manual.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-5, name
    # decoding: the prefill's causal triangle, one-token steps, and past the context the cache
    # restarting from a block after cached keys (the shifted triangle)
    prompt = idx[:, :9]
    assert torch.equal(fused.generate(prompt, 70, temperature=0), manual.generate(prompt, 70, temperature=0))
    chunks = []  # and a block of 5 after 9 cached positions: the triangle shifted right by them
    with torch.no_grad():
        for model in (fused, manual):
            for layer in model.layers:
                layer.self_attn.cache = KVCache(max_len=20)
            model(prompt)
            chunks.append(model(idx[:, 9:14], targets=torch.zeros_like(idx[:, 9:14]), pos=9)[0])
            for layer in model.layers:
                layer.self_attn.cache = None
    assert (chunks[0] - chunks[1]).abs().max() <= 1e-5

def test_parameter_count_and_flops_against_hand_count():
    for tie in (False, True):
        cfg = tiny_config(tie_embeddings=tie)
        model = Transformer(cfg)
        V, C, L, F_, D = 96, 32, 2, cfg.ffn_hidden, 8
        per_layer = C * 4 * D + 2 * C * 2 * D + C * 4 * D + 3 * C * F_ + 2 * C  # q, k+v, o, mlp, norms
        body = L * per_layer + C
        assert F_ == 96  # 2/3 * 4 * 32 = 85.3, rounded up to a multiple of 16
        assert model.num_params() == body + V * C * (1 if tie else 2)
        assert model.num_params(embeddings=False) == body
        assert model.flops_per_token(64) == 6 * (body + V * C) + 12 * L * 4 * D * 64

@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_matches_torch_flop_counter(tie):
    """torch's FlopCounterMode over a forward and backward: on the CPU it cannot see inside the fused
    attention kernel, so without it the count is ours minus the attention term; with the math
    backend (attention as plain batched matmuls) it is all of ours."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = tiny_config(vocab_size=512, n_embd=128, n_head=4, n_kv_head=2, n_layer=3, tie_embeddings=tie)
    model, (B, T) = Transformer(cfg), (4, 64)
    idx = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(0))
    ours, attention = model.flops_per_token(T) * B * T, 12 * cfg.n_layer * cfg.n_embd * T * B * T
    for backend, expected in [(SDPBackend.FLASH_ATTENTION, ours - attention), (SDPBackend.MATH, ours)]:
        with sdpa_kernel(backend), FlopCounterMode(display=False) as counter:
            model(idx, idx)[1].backward()
        assert counter.get_total_flops() == pytest.approx(expected, rel=0.01), backend

@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=30), "n_embd=30 is not divisible by n_head=4"),
    (dict(n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
    (dict(n_embd=36, n_head=12, n_kv_head=4), "head dim n_embd/n_head=3 is odd"),
    (dict(pos_emb="alibi"), "pos_emb='alibi' is not one of"),
    (dict(mlp="relu"), "mlp='relu' is not one of"),
    (dict(norm="batchnorm"), "norm='batchnorm' is not one of"),
    (dict(n_layer=0), "n_layer=0 must be positive"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(ffn_hidden=-1), "ffn_hidden=-1"),
    (dict(rope_theta=0.0), "rope_theta=0.0"),
])
def test_config_errors_name_the_values(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        tiny_config(**overrides)

def test_sequence_longer_than_context_is_an_error():
    model = random_model(max_seq_len=16)
    with pytest.raises(ValueError, match="positions up to 17 > max_seq_len=16; crop from the left"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="positions up to 17 > max_seq_len=16"):  # a prompt too long to prefill
        model.generate(torch.zeros(1, 17, dtype=torch.long), 5)
    assert all(layer.self_attn.cache is None for layer in model.layers)  # cleaned up after the error

@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "RoPE scaling"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "RoPE scaling"),  # transformers 4
    (dict(hidden_act="gelu"), "silu and no biases"),
    (dict(attention_bias=True), "silu and no biases"),
    (dict(head_dim=16), "head_dim \\* heads = hidden_size"),
])
def test_from_hf_refuses_what_it_cannot_represent(change, message):
    """A config our model cannot express exactly is an error, not a silently different model."""
    state, config = to_hf(random_model().state_dict(), tiny_config())
    from_hf(state, config)  # the unchanged config imports
    with pytest.raises(ValueError, match=message):
        from_hf(state, {**config, **change})

# -----------------------------------------------------------------------------
# sampling (model.sample_next)

def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    greedy = sample_next(logits, temperature=0)
    assert torch.equal(greedy[:, 0], logits.argmax(-1))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(sample_next(logits, temperature=1.3, top_k=1, generator=g), greedy)

def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)

    def support(top_p):
        draws = torch.cat([sample_next(logits, top_p=top_p, generator=g) for _ in range(400)])
        return set(draws[:, 0].tolist())

    assert support(0.35) == {1}           # 0.4 alone reaches 0.35
    assert support(0.6) == {1, 3}         # 0.4 + 0.3 = 0.7 >= 0.6
    assert support(0.75) == {1, 3, 4}     # 0.7 < 0.75; adding 0.15 reaches it
    assert support(0.9) == {1, 3, 4, 2}   # 0.85 < 0.9 <= 0.95
    assert support(1.0) == {0, 1, 2, 3, 4}

def test_generate_never_samples_padding_ids():
    model = random_model()
    with torch.no_grad():  # final norm weight 0: every logit is 0, all 96 ids equally likely
        model.norm.weight.zero_()
    prompt = torch.zeros(4, 1, dtype=torch.long)
    limited = model.generate(prompt, 30, generator=torch.Generator().manual_seed(0), vocab_size=90)
    unlimited = model.generate(prompt, 30, generator=torch.Generator().manual_seed(0))
    assert limited.max() < 90 <= unlimited.max()  # ids 90..95 pad the embedding past the tokenizer

def test_sampling_with_a_seeded_generator_repeats():
    model = random_model()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    runs = [model.generate(prompt, 30, temperature=1.0, top_k=20,
                           generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])

def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less(monkeypatch):
    def run(checkpointing):
        torch.manual_seed(0)
        model = Transformer(tiny_config(n_layer=3, dropout=0.1))  # dropout: the recomputation must redraw it alike
        model.checkpointing = checkpointing
        idx = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
        saved = []  # bytes of every tensor kept for the backward pass

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t
        torch.manual_seed(2)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(idx, idx)
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters()], sum(saved)
    plain, kept = run(False), run(True)
    assert kept[0] == pytest.approx(plain[0], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain[1], kept[1]))
    assert kept[2] < 0.5 * plain[2], (kept[2], plain[2])

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_chunked_loss_equals_the_plain_loss_and_gradients(reduction):
    def run(chunk):
        torch.manual_seed(0)
        model = Transformer(tiny_config(tie_embeddings=True))
        model.loss_chunk = chunk
        idx = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(1))
        targets = idx.clone()
        targets[0, :7] = -1  # ignored positions, across a chunk boundary
        _, loss = model(idx, targets, reduction=reduction)
        loss.sum().backward()
        return loss.detach(), [p.grad for p in model.parameters()]
    plain, chunked = run(0), run(17)  # 120 positions: 7 chunks, the last one short
    assert chunked[0].shape == plain[0].shape
    assert torch.allclose(chunked[0], plain[0], rtol=1e-6, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain[1], chunked[1]))
