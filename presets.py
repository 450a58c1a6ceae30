"""
The seed runs as settings: train.py --preset=NAME starts from one of these groups of TrainConfig
and ModelConfig values; flags given win, and the run's banner prints every value that differs from
the defaults, so nothing a preset sets goes unseen. Without --preset, train.py runs the defaults:
the CPU demo (Tiny Shakespeare, 1.27M parameters, about a minute).

    python train.py --preset=gpt2_small --dry-run --gpu-memory=80    # what it sets, and will it fit

Each preset names its whole model shape and optimizer, so none inherits the CPU demo's. The model's
vocab_size is the one its data needs (GPT-2's 50257 ids rounded up to a multiple of 64: 50304), so
a --dry-run plans the right size without the data; without a preset it comes from the data. A
preset that gives the run's length in tokens (max_tokens) replaces the demo's max_iters.
"""
import textwrap

from common import flag

PRESETS = {
    # Fine-tune the demo model into a chat model on data/shakespeare_chat (prepare.py's preset of the
    # same name): loss on the replies only, from out/shakespeare/best.pt.
    "shakespeare_chat": dict(init_from="out/shakespeare/best.pt", data="data/shakespeare_chat",
                             out_dir="out/shakespeare_chat", batch_size=16, max_iters=200, optimizer="adamw",
                             lr=1e-3, warmup_iters=20, eval_every=100, eval_batches=10),
    # Then teach it to prefer the true next speech over one from elsewhere in the play (DPO, dpo.py) on
    # data/shakespeare_dpo (prepare.py's preset), from out/shakespeare_chat/best.pt.
    "shakespeare_dpo": dict(init_from="out/shakespeare_chat/best.pt", data="data/shakespeare_dpo",
                            out_dir="out/shakespeare_dpo", objective="dpo", beta=0.1, batch_size=8, max_iters=150,
                            optimizer="adamw", lr=1e-4, warmup_iters=15, eval_every=50, eval_batches=8),
    # lilLM (39M): vocab 8192 (its own BPE on OpenWebText), d512, 12 layers, 16 query / 8 kv heads,
    # seq 512, tied embeddings; ~8B tokens.
    "lillm_39m": dict(vocab_size=8192, n_layer=12, n_head=16, n_kv_head=8, n_embd=512, multiple_of=64,
                      max_seq_len=512, tie_embeddings=True,
                      data="data/openwebtext_8k", out_dir="out/lillm_39m", batch_size=64, batch_tokens=262144,
                      max_tokens=8_000_000_000, optimizer="adamw", lr=1e-3, warmup_iters=500,
                      eval_every=250, eval_batches=20),
    # The TinyStories model of a CS336-style project (22.7M, 12.5M without embeddings): its own 10k
    # byte-level BPE (prepare.py --preset tinystories-10k), untied head, d512, 4 layers, 16 heads,
    # d_ff 1344, context 256, 32 x 256 tokens x 5000 steps = 41M tokens, warmup 2 %, cosine to lr/100,
    # lr 1e-3: its sweep's best (3e-3 struggled to converge, 1e-2 diverged).
    # Its ablations are flags: --norm=none, --pos-emb=none, --mlp=silu|gelu (README: ablations).
    "tinystories_23m": dict(vocab_size=10048, n_layer=4, n_head=16, n_kv_head=16, n_embd=512, ffn_hidden=1344,
                            max_seq_len=256, tie_embeddings=False,
                            data="data/tinystories_10k", out_dir="out/tinystories_23m", batch_size=32,
                            max_iters=5000, optimizer="adamw", lr=1e-3, warmup_iters=100, min_lr_ratio=0.01,
                            eval_every=500, eval_batches=20),
    # The ~220M Llama-3-shaped model of a "one GPU in one day" harness (219M, 168M without
    # embeddings): GQA 16 q / 4 kv heads, SwiGLU, tied, GPT-2 tokens (vocab 50304), Muon + AdamW,
    # warmup then a constant lr, on a web/text mixture; 20 tokens per parameter (4.4B). Its exact
    # widths are not in our notes: d1024 x 16 layers, ffn 2560 gives its size with Llama 3's shape.
    "llama3_220m": dict(vocab_size=50304, n_layer=16, n_head=16, n_kv_head=4, n_embd=1024, ffn_hidden=2560,
                        max_seq_len=2048, tie_embeddings=True,
                        data="data/fineweb_edu:0.8,data/openwebtext:0.2", out_dir="out/llama3_220m",
                        batch_size=8, batch_tokens=524288, max_tokens=4_400_000_000,
                        optimizer="muon", muon_lr=0.02, muon_momentum=0.95, lr=3e-3, warmup_iters=300,
                        min_lr_ratio=1.0, eval_every=1000, eval_batches=20, hellaswag_every=2000),
    # The "$50" GPT-2-style model (51.0M, 25.2M without embeddings), sized by a Chinchilla IsoFLOP
    # argument: N ~ 50M and D ~ 1.1B tokens for ~320 PFLOPs (python plan.py --flops=3.2e17). GPT-2's
    # parts: learned positions, LayerNorm, GELU MLP, tied; d512, 8 layers, 8 heads, block 64. No
    # biases (ours has none anywhere), so it has ~0.05M fewer parameters than the original.
    "gpt2_51m": dict(vocab_size=50304, n_layer=8, n_head=8, n_kv_head=8, n_embd=512, ffn_hidden=2048,
                     max_seq_len=64, tie_embeddings=True, pos_emb="learned", norm="layernorm", mlp="gelu",
                     data="data/fineweb_edu", out_dir="out/gpt2_51m", batch_size=512, batch_tokens=524288,
                     max_tokens=1_100_000_000, optimizer="adamw", lr=1e-3, warmup_iters=100,
                     eval_every=250, eval_batches=20),
    # LF_LLM-269M: d1024, 16 layers, 16 heads, a 4x (4096-wide) SwiGLU, seq 2048, tied: 320M in all,
    # 269M without the tied embedding, as the seed counts. ~0.5M-token batches, lr 2.1e-3, betas
    # 0.9/0.95, eps 1e-8, clip 1.0, weight decay 0.1, warmup for 119M tokens (227 steps), cosine to
    # 10 %, 10B tokens; dropout after attention (0.1) and after the SwiGLU activation (0.15), which
    # our one dropout setting gives as 0.1 on attention and on both residual branches.
    "lf_llm_269m": dict(vocab_size=50304, n_layer=16, n_head=16, n_kv_head=16, n_embd=1024, ffn_hidden=4096,
                        max_seq_len=2048, tie_embeddings=True, dropout=0.1,
                        data="data/fineweb_edu", out_dir="out/lf_llm_269m", batch_size=16, batch_tokens=524288,
                        max_tokens=10_000_000_000, optimizer="adamw", lr=2.1e-3, warmup_iters=227,
                        eval_every=1000, eval_batches=20, hellaswag_every=2000),
    # GPT-2-small class (~124M) on FineWeb-Edu 10B, the build-nanogpt / llm.c recipe with Llama parts.
    # batch_size 16 keeps the fp32 logits of a micro-batch (16 x 1024 x 50304) near 3 GB.
    "gpt2_small": dict(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, n_embd=768, ffn_hidden=2048,
                       max_seq_len=1024, tie_embeddings=True,
                       data="data/fineweb_edu", out_dir="out/gpt2_small", batch_size=16, batch_tokens=524288,
                       max_tokens=10_000_000_000, optimizer="adamw", lr=6e-4, warmup_iters=700,
                       eval_every=500, eval_batches=20, hellaswag_every=2000),
}

HELP = "presets (python train.py --preset=NAME; without one, the defaults above: the CPU demo):\n" + \
    "\n".join(textwrap.fill(" ".join(f"{flag(k)}={v}" for k, v in p.items()), 100, break_on_hyphens=False,
                             initial_indent=f"  {name}: ", subsequent_indent="      ")
              for name, p in PRESETS.items())

# What each seed run's author reported, and where our preset differs from it and why: the banner
# prints the note, docs/seed-runs.md the table, and a test holds each preset's size to the count its
# seed states (params, counted "total" or "without embeddings", as the seed counts them).
SEEDS = {
    "lillm_39m": dict(
        name="lilLM", params=(39e6, "total"),
        reported="39M parameters, ~8B tokens on 2 x A100 in about 2-2.5 h ($2.475 per GPU-hour)",
        differs="none known: the same shape, OpenWebText with an own 8k BPE (prepare.py --preset openwebtext-8k)"),
    "tinystories_23m": dict(
        name="KevinL10/lm (a CS336-style TinyStories model)", params=(22.7e6, "total"),
        reported="best learning rate ~1e-3 in its sweep (3e-3 struggled to converge, 1e-2 diverged); without "
                 "RMSNorm the loss blew up",
        differs="none known: TinyStories with its own 10k BPE (prepare.py --preset tinystories-10k)"),
    "llama3_220m": dict(
        name='a "one GPU in one day" Llama 3 harness', params=(220e6, "total"),
        reported="not in our notes beyond its size and its 20 tokens per parameter",
        differs="its exact widths are not in our notes: d1024 x 16 layers and ffn 2560 give its size"),
    "gpt2_51m": dict(
        name='the "$50" GPT', params=(50e6, "total"),
        reported="~50M parameters on 1.1B tokens, one V100 in under a day, about $50",
        differs="FineWeb-Edu with GPT-2's tokens instead of BookCorpus with an own BPE: BookCorpus was withdrawn "
                "by its authors and only unofficial copies remain; no biases (-0.05M parameters)"),
    "lf_llm_269m": dict(
        name="LF_LLM-269M", params=(268_682_240, "without embeddings"),
        reported="val loss 2.806 (perplexity 16.5) and HellaSwag 35.6 % after 10B tokens; 8 h 47 min on "
                 "8 x A100 at ~309k tokens/s",
        differs="one dropout (0.1) on attention and both residual branches, where the seed has 0.1 after "
                "attention and 0.15 after the SwiGLU activation"),
    "gpt2_small": dict(
        name="GPT-2 small, as build-nanogpt and llm.c reproduce it", params=(124e6, "total"),
        reported="OpenAI's GPT-2 124M: HellaSwag ~29.5 % (build-nanogpt's acc_norm)",
        differs="Llama's parts (RoPE, RMSNorm, SwiGLU, no biases) on FineWeb-Edu, as build-nanogpt trains it"),
}
