"""memory.py's plan against what PyTorch actually keeps: the bytes autograd saves for backward
(memory.saved_bytes counts them with saved_tensors_hooks), and the tensors an optimizer step
leaves behind."""
import functools

import pytest
import torch

import train as train_py
from conftest import tiny_config
from memory import kept_bytes, memory_plan, saved_bytes
from model import Transformer
from muon import Muon

@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("shape", [dict(n_kv_head=2), dict(n_kv_head=4, tie_embeddings=True, n_embd=64),
                                   dict(n_kv_head=4, mlp="gelu", norm="layernorm", pos_emb="learned"),
                                   dict(mlp="geglu", norm_position="post"), dict(attention="manual")])
def test_the_activation_plan_is_the_bytes_saved_for_backward(amp, shape):
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_layer=3, **shape))
    B, T = 4, 64
    idx = torch.randint(0, 96, (B, T))
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=amp)
    measured = saved_bytes(model, idx, autocast)
    # On a CPU, model.py keeps attention in fp32 under autocast.
    plan = functools.partial(kept_bytes, model.config, B * T, amp, attention_fp32=True, log_probs=True)
    assert measured == pytest.approx(plan(), rel=0.03)
    # Checkpointing keeps only each block's input (fp32, the residual stream) of all the blocks save
    model.checkpointing = True
    assert saved_bytes(model, idx, autocast) == pytest.approx(plan(checkpointing=True), rel=0.03)

def state_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0)  # not AdamW's step counts

@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_weights_gradients_and_optimizer_state_are_the_planned_bytes(optimizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config(tie_embeddings=True))
    cfg = train_py.TrainConfig(optimizer=optimizer, max_iters=1)
    rt = train_py.Runtime(distributed=False, rank=0, local_rank=0, world=1, device=torch.device("cpu"),
                          dtype=torch.float32)
    optimizers = train_py.build_optimizers(model, cfg, rt)
    idx = torch.randint(0, 96, (2, 16))
    model(idx, idx)[1].backward()
    for opt in optimizers:
        opt.step()
    assert isinstance(optimizers[0], Muon) == (optimizer == "muon")
    plan = memory_plan(model, 2, 1, False, optimizer, amp=False)
    assert plan.weights == state_bytes(model.parameters())
    assert plan.grads == state_bytes(p.grad for p in model.parameters())
    assert plan.optimizer == state_bytes(t for opt in optimizers for s in opt.state.values() for t in s.values())
    assert plan.comms == 0
    # Under FSDP each of 4 processes holds a quarter of all three; DDP adds buckets as large as the gradients.
    fsdp = memory_plan(model, 2, 4, True, optimizer, amp=False)
    ddp = memory_plan(model, 2, 4, False, optimizer, amp=False)
    assert (fsdp.weights, fsdp.grads, fsdp.optimizer) == (plan.weights / 4, plan.grads / 4, plan.optimizer / 4)
    assert ddp.comms == plan.grads

def test_the_chunked_loss_plans_one_chunk_of_logits():
    model = Transformer(tiny_config())
    whole = memory_plan(model, 64, 1, False, "adamw", amp=True)
    chunked = memory_plan(model, 64, 1, False, "adamw", amp=True, loss_chunk=1024)
    assert chunked.logits == whole.logits * 1024 / (64 * 64)
    assert chunked.activations == whole.activations

def test_dry_run_plans_a_preset_on_a_gpu_and_names_the_fixes(capsys):
    # gpt2_small on one 24 GiB GPU with micro-batches of 32 x 1024: too much; the fixes are flags
    big = ["--preset=gpt2_small", "--dry-run", "--gpu-memory=24", "--batch-size=32"]
    train_py.main(big)
    out, err = capsys.readouterr()
    assert "123.59M parameters" in out and "1 process(es) x 16 micro-batch(es) of 32 sequences" in out
    assert "memory  " in out and "will not fit in 24 GiB" in err
    assert "--chunked-loss" in err and "--activation-checkpointing" in err and "--batch-size=16" in err
    train_py.main(big + ["--chunked-loss", "--activation-checkpointing"])
    out, err = capsys.readouterr()
    assert "fits: " in out and not err
    # on 8 GPUs under FSDP each holds an eighth of the weights (0.46 GiB on one)
    train_py.main(["--preset=gpt2_small", "--dry-run", "--gpu-memory=80", "--gpus=8", "--parallel=fsdp"])
    out, _ = capsys.readouterr()
    assert "8 process(es) (FSDP) x 4 micro-batch(es)" in out and "weights 0.06" in out
