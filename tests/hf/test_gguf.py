"""GGUF files as checkpoints: a tiny LLaMA written with the gguf package's writer (llama.cpp's tensor
names, metadata and q/k permutation, a byte-level BPE tokenizer) loads back through transformers with
the logits of the original, is profiled by the library and the CLI with its own tokenizer, and bad input
gives one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from gpas_probe.checkpoints import load, own_tokenizer, read_config  # noqa: E402
from gpas_probe.cli.main import app  # noqa: E402
from gpas_probe.evaldata import load_eval_data  # noqa: E402
from gpas_probe.profile import ProfileConfig, profile_many  # noqa: E402
from gpas_probe.store import load_run  # noqa: E402

runner = CliRunner()
V, LAYERS, H, FFN, HEADS, KV = 300, 2, 64, 128, 4, 2
SEQ, BS = 8, 2
Q8 = gguf.GGMLQuantizationType.Q8_0
NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(key: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if key in top:
        return top[key]
    _, _, layer, rest = key.split(".", 3)
    return f"blk.{layer}.{NAMES[rest.removesuffix('.weight')]}.weight"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert: q/k rows interleaved for its rotary embedding (transformers undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64,
                                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def byte_bpe() -> tuple[list[str], list[int], list[str]]:
    """tokens, token types, merges: 256 bytes, 40 merges of letters, <s>, </s>, unused tokens up to V."""
    spell = bytes_to_unicode()
    tokens = [spell[b] for b in range(256)]
    pairs = [(a, b) for a in "etaoinshrd" for b in "ehtnrs"][:40]
    merges = [f"{a} {b}" for a, b in pairs]
    tokens += [a + b for a, b in pairs] + ["<s>", "</s>"]
    types = [1] * len(tokens)
    types[-2:] = [3, 3]  # control
    tokens += [f"<unused{i}>" for i in range(V - len(tokens))]
    return tokens, types + [5] * (V - len(types)), merges


def write_gguf(path: Path, model: torch.nn.Module | None = None, kind: str = "f32", arch: str = "llama") -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(H // HEADS)
    tokens, types, merges = byte_bpe()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    state = (model or tiny_llama()).state_dict()
    for key, t in state.items():
        a = t.numpy().astype(np.float32)
        if "q_proj" in key or "k_proj" in key:
            a = llama_cpp_permute(a, HEADS if "q_proj" in key else KV)
        if a.ndim == 2 and kind == "q8_0":
            q = gguf.quantize(a, Q8)
            w.add_tensor(gguf_name(key), q, raw_shape=q.shape, raw_dtype=Q8)
        elif a.ndim == 2 and kind == "q8_1":  # a type gguf cannot dequantise
            nbytes = a.size // 32 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]
            w.add_tensor(gguf_name(key), np.zeros((a.shape[0], nbytes // a.shape[0]), np.uint8),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(gguf_name(key), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """GGUF tokenizers are written under the test's own cache folder, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, model) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)


def test_f32_round_trip_gives_the_original_logits(tiny_gguf, model) -> None:
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    for path in (tiny_gguf, tiny_gguf.parent):  # the file, or the folder holding it
        loaded = load(path, backend="auto")
        assert (loaded.backend, loaded.path, loaded.step) == ("hf", path, None)
        assert type(loaded.model).__name__ == "LlamaForCausalLM" and not loaded.model.training
        assert loaded.config["gguf"] == {"file": "tiny.gguf", "architecture": "llama", "tensor_types": ["F32"]}
        assert loaded.config["num_key_value_heads"] == KV
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    bf16 = load(tiny_gguf, backend="hf", dtype="bf16").model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="loads only with transformers"):
        load(tiny_gguf, backend="native")


def test_q8_0_is_dequantised(tmp_path, model) -> None:
    path = write_gguf(tmp_path / "q8.gguf", model, kind="q8_0")
    loaded = load(path, backend="auto").model
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    ref = tiny_llama()  # the original with every matrix through Q8_0 and back
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.ndim == 2:
                t.copy_(torch.from_numpy(gguf.dequantize(gguf.quantize(t.numpy(), Q8), Q8)))
    got, want = loaded.state_dict(), ref.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert 0 < float((got[q] - model.state_dict()[q]).abs().max()) < 1e-3  # quantised, then dequantised
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    assert read_config(path)["gguf"]["tensor_types"] == ["F32", "Q8_0"]


def test_own_tokenizer_comes_from_the_file(tiny_gguf, cache) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    path = own_tokenizer(tiny_gguf)
    assert path is not None and path.parent == cache / "gpas-probe" / "gguf"
    assert own_tokenizer(tiny_gguf.parent) == path  # written once
    tok = tokenizers.Tokenizer.from_file(str(path))
    assert tok.get_vocab_size(with_added_tokens=True) == V  # nothing beyond the model's vocabulary
    ids = tok.encode("the ants", add_special_tokens=False).ids
    tokens = byte_bpe()[0]
    assert [tokens[i] for i in ids] == ["th", "e", "Ġ", "an", "ts"]  # merged by the file's merges
    assert tok.decode(ids) == "the ants"


def test_profile_of_a_gguf_uses_its_tokenizer(tiny_gguf, model, short_text, tmp_path) -> None:
    config = ProfileConfig.of(data=str(short_text), batches=2, batch_size=BS, seq_len=SEQ, importance=False)
    (run,) = profile_many([tiny_gguf], tmp_path / "profiles", config)
    assert run == tmp_path / "profiles" / "tiny"  # named after the file
    df = load_run(run)
    assert set(df.layer[df.layer >= 0]) == set(range(LAYERS)) and {"resid_pre", "resid_post"} <= set(df.site)
    summary = json.loads((run / "profile.json").read_text())
    (record,) = summary["checkpoints"]
    assert record["tokenizer"] == str(own_tokenizer(tiny_gguf)) and summary["data"]["kind"] == "tokenizer"
    # the validation loss is the original model's on the text as the file's tokenizer cuts it
    data = load_eval_data(short_text, tokenizer=own_tokenizer(tiny_gguf))
    n, loss = data.num_targets(BS, SEQ, 2), 0.0
    with torch.no_grad():
        for ids, labels, _ in data.batches(BS, SEQ, 2):
            loss += float(F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten(), reduction="sum"))
    assert record["val_loss"] == pytest.approx(loss / n, rel=1e-5)


def test_cli_profiles_a_gguf(tiny_gguf, short_text, tmp_path) -> None:
    out = tmp_path / "profiles"
    res = runner.invoke(app, ["profile", str(tiny_gguf), "--out", str(out), "--data", str(short_text),
                              "--batches", "1", "--batch-size", str(BS), "--seq-len", str(SEQ)])
    assert res.exit_code == 0, res.output
    assert "profiled 1 checkpoint(s)" in res.output and len(load_run(out / "tiny"))


def _one_line_error(args: list[str]) -> str:
    res = runner.invoke(app, ["profile", *args, "--batches", "1", "--batch-size", "1", "--seq-len", "8"])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def test_errors_are_one_line(tiny_gguf, tmp_path, monkeypatch) -> None:
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(tiny_gguf.read_bytes())
    line = _one_line_error([str(two), "--out", str(tmp_path / "o")])
    assert "2 GGUF files here (a.gguf, b.gguf)" in line and "give the one to load" in line

    other = tmp_path / "other"
    other.mkdir()
    write_gguf(other / "net.gguf", arch="gpasnet")
    line = _one_line_error([str(other / "net.gguf"), "--out", str(tmp_path / "o")])
    assert "declares architecture 'gpasnet'" in line and "unsupported architecture" in line

    write_gguf(tmp_path / "q81.gguf", kind="q8_1")
    with pytest.raises(ValueError, match="unsupported quantisation type Q8_1"):
        load(tmp_path / "q81.gguf", backend="auto")
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load(tmp_path / "junk.gguf", backend="auto")
    assert not (tmp_path / "o").exists()

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf fails
    line = _one_line_error([str(tiny_gguf), "--out", str(tmp_path / "o")])
    assert "gguf is needed to read GGUF files" in line and 'pip install "gpas-probe[hf]"' in line
