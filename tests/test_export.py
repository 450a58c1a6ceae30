"""
export.py: the Hugging Face folder loads in transformers and generates as we do, its tokenizer
gives tiktoken's ids, sample.py --hf-dir reads it back, and an export never half-replaces a folder.

    python -m pytest -q test_export.py
"""
import json
import os

import pytest
import torch

import checkpoint
import common
import export
import sample
from checkpoint import load_for_inference
from tokenizer import load_tokenizer
import tokenizer
import hf
from conftest import (R50K, R50K_EOT, SMALL_BPE, SMALL_EOT, assert_user_error, python,
                      write_checkpoint)

UNICODE = ("héllo wörld — “quoted” naïve café 日本語のテキスト 🦙🦙 👍🏽 👨‍👩‍👧 Ω≈ç√ ﬁ\n\n\n"
           "\ttabs\t\tand   spaces   \n12345 6.02e23 it's they'll we've I'd")

def export_main(*args):
    export.main([str(a) for a in args])

def run_main(capsys, *args):
    sample.main([str(a) for a in args])
    return capsys.readouterr()

@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_generates_like_transformers(tmp_path, capsys, tie):
    transformers = pytest.importorskip("transformers")
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", SMALL_BPE, SMALL_EOT, seed=3, tie_embeddings=tie, n_kv_head=2)
    folder = tmp_path / "hf"
    export_main("--ckpt", ckpt, "--out", folder)
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.safetensors",
                                          "tokenizer.json", "tokenizer.tiktoken", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    assert hf.config.num_key_value_heads == 2 and hf.config.eos_token_id == SMALL_EOT
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tie

    model, enc, _, _ = load_for_inference(ckpt)
    for text in [" the hello", "and you 🦙"]:
        prompt = torch.tensor([enc.encode(text)])
        ours = model.generate(prompt, 30, temperature=0, eos_id=SMALL_EOT)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                             do_sample=False, pad_token_id=SMALL_EOT)
        assert ours.size(1) > prompt.size(1) + 5 and torch.equal(theirs, ours)

@pytest.mark.parametrize("spec", [R50K, SMALL_BPE], ids=["r50k_base", "small-bpe"])
def test_exported_tokenizer_encodes_like_tiktoken(tmp_path, capsys, spec, corpus):
    transformers = pytest.importorskip("transformers")
    eot = R50K_EOT if spec is R50K else SMALL_EOT
    export_main("--ckpt", write_checkpoint(tmp_path / "ckpt.pt", spec, eot), "--out", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = load_tokenizer(spec)
    shakespeare = corpus.read_text(encoding="utf-8")[:20_000]
    for text in [shakespeare, UNICODE, "  leading spaces", "x" + "<|endoftext|>" + "y"]:
        ids = enc.encode(text, allowed_special="all")
        assert tok.encode(text) == ids, text[:40]
        assert tok.decode(ids) == text
    assert tok.eos_token_id == eot and tok.bos_token_id == eot

def test_hf_dir_samples_like_the_checkpoint(tmp_path, capsys):
    r50k_ckpt = write_checkpoint(tmp_path / "r50k.pt", R50K, R50K_EOT)
    small_ckpt = write_checkpoint(tmp_path / "small.pt", SMALL_BPE, SMALL_EOT)
    pytest.importorskip("safetensors")
    greedy = ["--prompt", "Hello there, and", "--max-new-tokens", 30, "--temperature", 0]
    for name, ckpt in [("r50k", r50k_ckpt), ("small", small_ckpt)]:
        folder = tmp_path / name
        export_main("--ckpt", ckpt, "--out", folder)
        assert capsys.readouterr().out.startswith("wrote config.json")
        expected = run_main(capsys, "--ckpt", ckpt, *greedy).out
        assert run_main(capsys, "--hf-dir", folder, *greedy).out == expected
    # A Llama folder that carries no spec of ours: the tokenizer is named on the command line.
    config = json.loads((tmp_path / "r50k" / "config.json").read_text())
    del config["tiktoken_spec"]
    (tmp_path / "r50k" / "config.json").write_text(json.dumps(config))
    r50k_expected = run_main(capsys, "--ckpt", r50k_ckpt, *greedy).out
    assert run_main(capsys, "--hf-dir", tmp_path / "r50k", "--tokenizer", "r50k_base", *greedy).out == r50k_expected
    # ... or read from its tokenizer.json, as for folders from elsewhere (and re-saved exports)
    if (tmp_path / "r50k" / "tokenizer.json").exists():
        assert run_main(capsys, "--hf-dir", tmp_path / "r50k", *greedy).out == r50k_expected

def test_an_exported_folder_starts_a_fine_tune_from_any_working_directory(tmp_path, monkeypatch):
    # its BPE ranks sit beside config.json: read against the folder, and carried inline from there on
    folder = tmp_path / "hf"
    export_main("--ckpt", write_checkpoint(tmp_path / "small.pt", SMALL_BPE, SMALL_EOT), "--out", folder)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    init = checkpoint.hf_as_checkpoint(str(folder))
    assert "ranks_file" not in init["tokenizer"] and init["tokenizer"]["ranks"] == SMALL_BPE["ranks"]
    enc = checkpoint.tokenizer_from_checkpoint(init, str(folder), init["model_config"]["vocab_size"])
    assert enc.encode_ordinary("the hell") == load_tokenizer(SMALL_BPE).encode_ordinary("the hell")

def test_a_sharded_folder_names_its_shards_plainly(tmp_path, capsys):
    # an index whose weight_map points outside the folder, or at a symbolic link, is refused in one line
    folder = tmp_path / "hf"
    export_main("--ckpt", write_checkpoint(tmp_path / "small.pt", SMALL_BPE, SMALL_EOT), "--out", folder)
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    for shard, says in [("../outside.safetensors", "not a plain file name"), ("linked.safetensors", "symbolic link")]:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
        if shard == "linked.safetensors":
            (folder / shard).symlink_to(tmp_path / "outside.safetensors")
        with pytest.raises(SystemExit):
            run_main(capsys, "--hf-dir", folder, "--prompt", "the")
        assert says in capsys.readouterr().err, shard

def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}

def test_an_export_never_half_replaces_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    first, second = (write_checkpoint(run / name, SMALL_BPE, SMALL_EOT, seed=s) for s, name in [(1, "a.pt"), (2, "b.pt")])
    export_main("--ckpt", first)  # the default folder: hf/<the checkpoint's folder>
    folder = tmp_path / "hf" / "run"
    old = folder_bytes(folder)
    assert "model.safetensors" in old

    def refused(*args):
        with pytest.raises(SystemExit) as exit:
            export_main(*args)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return err
    assert "is not empty; pass --force" in refused("--ckpt", second)
    (tmp_path / "a_file").write_text("")
    assert "is a file" in refused("--ckpt", second, "--out", tmp_path / "a_file")
    learned = write_checkpoint(run / "learned.pt", SMALL_BPE, SMALL_EOT, pos_emb="learned")
    assert "pos_emb=learned" in refused("--ckpt", learned, "--out", tmp_path / "hf" / "learned")

    def disk_full(*args):
        raise OSError(28, "No space left on device", str(folder))
    with monkeypatch.context() as m:  # the disk fills up while the new export is written
        m.setattr(hf, "write_hf_tokenizer", disk_full)
        assert "No space left on device" in refused("--ckpt", second, "--force")
    assert folder_bytes(folder) == old and not list((tmp_path / "hf").glob("*partial*"))
    export_main("--ckpt", second, "--force")  # replaced, whole
    new = folder_bytes(folder)
    assert new.keys() == old.keys() and new["model.safetensors"] != old["model.safetensors"]
    common.release_locks()  # what the process does at exit: then no lock file or partial folder is left
    assert sorted(os.listdir(tmp_path / "hf")) == ["run"]

    # --force replaces an earlier export, never a folder with other files: a run, a user's notes
    run_files = folder_bytes(run)
    assert "holds a.pt, which export.py does not write" in refused("--ckpt", second, "--out", run, "--force")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    assert "holds notes.txt" in refused("--ckpt", second, "--out", tmp_path / "notes", "--force")
    assert folder_bytes(run) == run_files and (tmp_path / "notes" / "notes.txt").read_text() == "mine"
    # the current folder, or one that holds it, is never swapped away; nor is a file not a .gguf
    assert "is the current folder or holds it" in refused("--ckpt", second, "--out", ".", "--force")
    assert "is the current folder or holds it" in refused("--ckpt", second, "--out", "..", "--force")
    assert "is not a .gguf file" in refused("--ckpt", second, "--gguf=f32", "--out", run / "a.pt", "--force")
    assert folder_bytes(run) == run_files

@pytest.mark.slow
def test_help_and_a_bad_checkpoint_from_the_command_line(tmp_path):
    result = python("export.py", "--help")
    assert result.returncode == 0 and all(f"--{f}" in result.stdout for f in ("ckpt", "out", "force"))
    assert_user_error(python("export.py", "--ckpt", tmp_path / "none.pt"), "not found")

def test_a_chat_model_exports_its_template_and_answers_in_transformers_as_in_sample_chat(tmp_path, capsys,
                                                                                        monkeypatch):
    transformers = pytest.importorskip("transformers")
    import io

    import chat
    spec = {**SMALL_BPE, "special_tokens": {**SMALL_BPE["special_tokens"], **chat.chat_tokens(SMALL_EOT + 1)}}
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", spec, SMALL_EOT, seed=5, vocab_size=SMALL_EOT + 3)
    export_main("--ckpt", ckpt, "--out", tmp_path / "hf")
    capsys.readouterr()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = load_tokenizer(spec)
    system = [{"role": "system", "content": "Answer as the bard would."}]
    turns = [{"role": role, "content": text} for role, text in [
        ("user", "Where is the hell?"), ("assistant", " In you, and the rest."), ("user", "Then  sing!\n\nAnd then?"),
        ("assistant", "\nthe end"), ("user", "🦙 é"), ("assistant", "th th th")]]
    for messages in [turns[:n] for n in (1, 3, 5)] + [system + turns[:n] for n in (1, 3, 5)]:
        want = chat.render(enc, messages, reply=True)[0]
        got = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(got) == want, messages
    for messages in [turns[:2], system + turns[:6]]:  # whole conversations, as in training data
        got = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(got) == chat.render(enc, messages)[0]
    # the same reply, greedy, from transformers and from sample.py --chat
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.generation_config.eos_token_id == [SMALL_EOT, SMALL_EOT + 2]
    prompt = torch.tensor([chat.render(enc, system + turns[:1], reply=True)[0]])
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=25, do_sample=False,
                         pad_token_id=SMALL_EOT)[0, prompt.size(1):]
    monkeypatch.setattr("sys.stdin", io.StringIO(turns[0]["content"] + "\n"))
    out = run_main(capsys, "--ckpt", ckpt, "--chat", "--system", system[0]["content"], "--temperature", 0,
                   "--max-new-tokens", 25).out
    assert out == f"> {turns[0]['content']}\n" + tok.decode(theirs, skip_special_tokens=True) + "\n"

def test_padded_rows_are_cut_and_files_are_readable(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    # train.py rounds the vocabulary up to a multiple of 64: rows no token stands for
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", SMALL_BPE, SMALL_EOT, vocab_size=SMALL_EOT + 1 + 63)
    export_main("--ckpt", ckpt, "--out", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == SMALL_EOT + 1 and hf.config.pad_token_id == SMALL_EOT
    model, enc, _, _ = load_for_inference(ckpt)
    idx = torch.tensor([enc.encode("and the hell you")])
    with torch.no_grad():
        ours = model(idx, torch.zeros_like(idx))[0][0, :, :SMALL_EOT + 1]
        assert torch.allclose(hf(idx).logits[0], ours, atol=1e-5)  # the same model on every real id
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.pad_token_id == SMALL_EOT
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors as readable as the rest

@pytest.mark.parametrize("spec", [pytest.param("r50k", marks=pytest.mark.slow), "bpe"])  # r50k: 50k merges, ~9 s
def test_gguf_holds_our_weights_and_tokenizer(tmp_path, capsys, spec):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    if spec == "r50k":
        ckpt = write_checkpoint(tmp_path / "ckpt.pt", R50K, R50K_EOT, n_kv_head=2)
    else:  # a BPE with GPT-2's split pattern, as prepare.py trains, padded as train.py pads
        bpe = {**SMALL_BPE, "pat_str": tokenizer.GPT2_PAT}
        ckpt = write_checkpoint(tmp_path / "ckpt.pt", bpe, SMALL_EOT, n_kv_head=2, vocab_size=SMALL_EOT + 64)
    export_main("--ckpt", ckpt, "--gguf", "f32", "--out", tmp_path / "m.gguf")
    model, enc, eot, _ = load_for_inference(ckpt)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")

    def field(key):
        f = reader.fields[key]
        values = [f.parts[i] for i in f.data]
        return [bytes(v).decode() for v in values] if f.types[0] == gguf.GGUFValueType.STRING or (
            f.types[0] == gguf.GGUFValueType.ARRAY and f.types[-1] == gguf.GGUFValueType.STRING) else \
            [v.tolist()[0] for v in values]
    mc = model.config
    expect = {"general.architecture": ["llama"], "llama.context_length": [mc.max_seq_len],
              "llama.attention.head_count": [mc.n_head], "llama.attention.head_count_kv": [2],
              "llama.rope.freq_base": [mc.rope_theta], "llama.embedding_length": [mc.n_embd],
              "llama.block_count": [mc.n_layer], "tokenizer.ggml.model": ["gpt2"], "tokenizer.ggml.pre": ["gpt-2"],
              "tokenizer.ggml.eos_token_id": [eot], "tokenizer.ggml.bos_token_id": [eot]}
    for key, value in expect.items():
        assert field(key) == pytest.approx(value) if isinstance(value[0], float) else field(key) == value, key
    assert field("llama.attention.layer_norm_rms_epsilon")[0] == pytest.approx(mc.norm_eps)
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == enc.n_vocab and tokens[eot] == "<|endoftext|>"
    char = hf.bytes_to_unicode()  # each token's bytes, in GPT-2's visible characters
    assert all(tokens[i] == "".join(char[b] for b in enc.decode_single_token_bytes(i)) for i in range(0, eot, 7))
    # the tensors: our weights, q and k in the interleaved RoPE layout, the padded rows cut
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    state = model.state_dict()
    assert np.array_equal(tensors["token_embd.weight"], state["embed_tokens.weight"][:enc.n_vocab].numpy())
    q = state["layers.1.self_attn.q_proj.weight"].numpy()
    D = mc.head_dim
    heads = q.reshape(mc.n_head, D, -1)
    interleaved = np.stack([heads[:, :D // 2], heads[:, D // 2:]], axis=2).reshape(q.shape)  # rows i, i + D/2 paired
    assert np.array_equal(tensors["blk.1.attn_q.weight"], interleaved)
    assert np.array_equal(tensors["blk.0.ffn_down.weight"], state["layers.0.mlp.down_proj.weight"].numpy())
    assert ("output.weight" in tensors) == (not mc.tie_embeddings)

def test_a_chat_gguf_gives_llama_cpp_the_ids_the_model_was_trained_on(tmp_path, capsys):
    # llama.cpp renders a conversation with its built-in ChatML (llama-cli -cnv, llama-server) or with
    # the GGUF's jinja template (--jinja), then tokenizes it adding BOS when the GGUF says add_bos. Both
    # must give chat.render's ids, which start with end-of-text, as every training conversation does.
    gguf = pytest.importorskip("gguf")
    jinja2 = pytest.importorskip("jinja2")
    import chat
    specials = {**SMALL_BPE["special_tokens"], **chat.chat_tokens(SMALL_EOT + 1)}
    bpe = {**SMALL_BPE, "pat_str": tokenizer.GPT2_PAT, "special_tokens": specials}
    ckpt = write_checkpoint(tmp_path / "chat.pt", bpe, SMALL_EOT, vocab_size=SMALL_EOT + 64)
    export_main("--ckpt", ckpt, "--gguf", "f32", "--out", tmp_path / "chat.gguf")
    assert "llama-cli -m" in capsys.readouterr().out  # how to chat with it
    _, enc, eot, _ = load_for_inference(ckpt)
    fields = gguf.GGUFReader(tmp_path / "chat.gguf").fields

    def value(key):
        f = fields[key]
        return bytes(f.parts[f.data[0]]).decode() if f.types[0] == gguf.GGUFValueType.STRING else f.parts[f.data[0]][0]
    assert value("tokenizer.ggml.add_bos_token") and value("tokenizer.ggml.bos_token_id") == eot
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the hell, you say"},
                {"role": "assistant", "content": "ell and the"}, {"role": "user", "content": "and you?"}]
    want = chat.render(enc, messages, reply=True)[0]
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    chatml += "<|im_start|>assistant\n"
    jinja = jinja2.Template(value("tokenizer.chat_template")).render(messages=messages, add_generation_prompt=True)
    for text in (chatml, jinja):
        assert [eot] + enc.encode(text, allowed_special="all") == want
    # a base model's prompts are continued as given, as sample.py does: no BOS added
    export_main("--ckpt", write_checkpoint(tmp_path / "base.pt", {**SMALL_BPE, "pat_str": tokenizer.GPT2_PAT},
                                           SMALL_EOT), "--gguf", "f32", "--out", tmp_path / "base.gguf")
    assert not gguf.GGUFReader(tmp_path / "base.gguf").fields["tokenizer.ggml.add_bos_token"].parts[-1][0]

@pytest.mark.slow
def test_gguf_refuses_a_tokenizer_llama_cpp_cannot_split(tmp_path):
    pytest.importorskip("gguf")
    result = python("export.py", "--ckpt", write_checkpoint(tmp_path / "ckpt.pt", SMALL_BPE, SMALL_EOT), "--gguf",
                    "f16", "--out", tmp_path / "m.gguf")
    assert_user_error(result, "splits text another way")
    assert not (tmp_path / "m.gguf").exists()

def test_an_export_resaved_by_transformers_still_samples_like_the_checkpoint(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", SMALL_BPE, SMALL_EOT, seed=4)
    export_main("--ckpt", ckpt, "--out", tmp_path / "hf")
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):  # no tiktoken files left
        cls.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "resaved")
    assert not (tmp_path / "resaved" / "tokenizer.tiktoken").exists()
    greedy = ["--prompt", "and the hell", "--max-new-tokens", 20, "--temperature", 0]
    capsys.readouterr()
    expected = run_main(capsys, "--ckpt", ckpt, *greedy).out
    assert run_main(capsys, "--hf-dir", tmp_path / "resaved", *greedy).out == expected
