"""``gpas_probe.profile`` against brute-force references (DESIGN §6, §7): every statistic, padding excluded,
streamed batches, run folders, Hugging Face checkpoints with their tokenizer."""

from __future__ import annotations

import json
import math
import shutil
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from profile_runs import BS, NB, SEQ, word_tokenizer, words_text
from typer.testing import CliRunner

from gpas_probe.analysis import layer_importance, naive_deletion_importance, to_long
from gpas_probe.checkpoints import load_checkpoint, step_checkpoints
from gpas_probe.evaldata import EvalData, load_eval_data
from gpas_probe.probes import ACTIVATION_SITES
from gpas_probe.profile import (
    PROFILE_FILE,
    ProfileConfig,
    checkpoint_groups,
    profile_checkpoint,
    profile_many,
    profile_model,
)
from gpas_probe.store import load_run, read_meta

runner = CliRunner()


@pytest.fixture
def run(tiny_gpas_run):
    return tiny_gpas_run


# ------------------------------------------------------------------------------ brute-force profile


def _reference(model, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, float]:
    """Statistics from each row run alone, unpadded, with our own hooks; gradients of the token-mean
    loss over all rows. Keys (layer, site, direction, stat)."""
    n_total = sum(len(labels) for _, labels in rows)
    seen: dict[tuple, list[torch.Tensor]] = {}
    handles = []
    for block in model.layers:
        for site in ACTIVATION_SITES:
            def fwd(_m, _a, out, key=(block.layer, site)):
                seen.setdefault(key + ("fwd",), []).append(out.detach()[0].double())
                out.register_hook(lambda g: seen.setdefault(key + ("bwd",), []).append(g[0].double()))
            handles.append(getattr(block, f"hook_{site}").register_forward_hook(fwd))
    model.zero_grad(set_to_none=True)
    loss_sum = 0.0
    try:
        for ids, labels in rows:
            loss = F.cross_entropy(model(ids[None]).logits[0].float(), labels, reduction="sum")
            (loss / n_total).backward()
            loss_sum += float(loss.detach())
    finally:
        for h in handles:
            h.remove()
    ref = {}
    for key, parts in seen.items():
        x = torch.cat(parts)
        ref[key + ("var",)] = float(x.var(-1, correction=0).mean())
        ref[key + ("rms",)] = float(x.pow(2).mean().sqrt())
        ref[key + ("absmax",)] = float(x.abs().max())
    for block in model.layers:
        sq = sum(float(p.grad.double().pow(2).sum()) for p in block.parameters() if p.grad is not None)
        ref[(block.layer, "params", "none", "grad_norm")] = math.sqrt(sq)
    ref[(-1, "model", "none", "grad_norm")] = math.sqrt(sum(float(p.grad.double().pow(2).sum())
                                                            for p in model.parameters()))
    model.zero_grad(set_to_none=True)
    return ref, loss_sum / n_total


def _values(frame: pd.DataFrame) -> pd.Series:
    return frame.set_index(["layer", "site", "direction", "stat"])["value"]


def test_profile_matches_brute_force_and_excludes_padding(run, short_text, tmp_path) -> None:
    ckpt = step_checkpoints(run)[-1]
    dest = profile_many([ckpt], tmp_path / "out", ProfileConfig.of(data=short_text, batches=NB, batch_size=BS,
                                                                   seq_len=SEQ, device="cpu"))[0]
    assert dest == tmp_path / "out" / "myrun"
    frame = load_run(dest)
    assert list(frame.columns) == ["run_id", "step", "layer", "site", "direction", "stat", "value"]
    assert set(frame["step"]) == {4} and set(frame["run_id"]) == {"myrun"}  # the checkpoint's step
    got = _values(frame)
    assert got.index.is_unique

    model = load_checkpoint(ckpt)
    tokens = torch.tensor(list(short_text.read_bytes()))
    rows = [(tokens[i:i + m], tokens[i + 1:i + 1 + m]) for i in range(0, 69, SEQ) if (m := min(SEQ, 69 - i))]
    assert [len(r[1]) for r in rows] == [16, 16, 16, 16, 5]
    ref, val_loss = _reference(model, rows)
    assert len(ref) == 4 * 5 * 2 * 3 + 4 + 1
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-12), key
    assert got[(-1, "model", "none", "val_loss")] == pytest.approx(val_loss, rel=1e-5)
    assert "update_ratio" not in set(frame["stat"])
    assert {"shortcut_branch_ratio", "weight_norm", "alpha", "scale", "alpha_grad"} <= set(frame["stat"])

    # importance: the rows of to_long, and deletion equal to delete-and-rerun on the same batches
    data = load_eval_data(short_text)
    naive = naive_deletion_importance(model, data.batches(BS, SEQ, NB))
    keys = [(layer, "importance", "none", "deletion_delta") for layer in naive["layer"]]
    assert got.loc[keys].tolist() == pytest.approx(naive["delta"].tolist(), rel=1e-5, abs=1e-6)
    assert naive["base_loss"].iloc[0] == pytest.approx(val_loss, rel=1e-5)
    imp = layer_importance(model, data.batches(BS, SEQ, NB), normalize_rows=True)
    long = pd.concat([to_long(df, "myrun", 4) for df in imp.values()], ignore_index=True)
    mine = frame[frame["stat"].isin(set(long["stat"]))]
    assert len(mine) == len(long)
    assert dict(mine.dtypes.astype(str)) == dict(long.dtypes.astype(str))
    merged = long.merge(mine, on=["step", "layer", "site", "direction", "stat"], suffixes=("", "_got"))
    assert len(merged) == len(long)
    np.testing.assert_allclose(merged["value_got"], merged["value"], rtol=1e-6, atol=1e-9)

    summary = json.loads((dest / PROFILE_FILE).read_text())
    assert summary["checkpoints"][0]["step"] == 4 and summary["checkpoints"][0]["target_tokens"] == 69
    meta = read_meta(dest)
    assert meta["profile"]["checkpoints"][0]["config"]["gpas_probe"]["step"] == 4
    assert meta["profile"]["data"]["source"] == str(short_text) and meta["model_config"]["gpas"] is True


def test_padding_changes_nothing(run, short_text, tmp_path) -> None:
    """The same real tokens, once in a padded batch and once in full rows only, give the same statistics."""
    model = load_checkpoint(run)
    tokens = np.frombuffer(short_text.read_bytes(), np.uint8)
    padded = EvalData("padded", tokens, "bytes", "x")  # rows of 16, 16 | 16, 16 | 5 + padding
    full = profile_model(model, EvalData("full", tokens[:65], "bytes", "x"),
                         ProfileConfig.of(batches=2, batch_size=2, seq_len=SEQ, importance=False))
    tail = profile_model(model, EvalData("tail", tokens[64:], "bytes", "x"),
                         ProfileConfig.of(batches=1, batch_size=1, seq_len=5, importance=False))
    both = profile_model(model, padded, ProfileConfig.of(batches=3, batch_size=2, seq_len=SEQ, importance=False))
    # max over the two parts must be the max over all; the padded row's zeros must not enter
    a, b, c = _values(full), _values(tail), _values(both)
    absmax = [k for k in c.index if k[3] == "absmax" and k[2] == "fwd"]
    assert [c[k] for k in absmax] == pytest.approx([max(a[k], b[k]) for k in absmax], rel=1e-6)
    # the token-weighted mean of var over 64 + 5 tokens (fwd activations do not depend on the loss scale)
    var = [k for k in c.index if k[3] == "var" and k[2] == "fwd"]
    assert [c[k] for k in var] == pytest.approx([(64 * a[k] + 5 * b[k]) / 69 for k in var], rel=1e-5)


def test_profile_streams_batches(run, short_text, monkeypatch) -> None:
    model = load_checkpoint(run)
    data = load_eval_data(short_text)
    real = EvalData.batches
    alive: list[int] = []
    refs: list[weakref.ref] = []

    def tracked(self, *args):
        for batch in real(self, *args):
            alive.append(sum(r() is not None for r in refs))  # earlier batches still in memory
            refs.append(weakref.ref(batch[0]))
            yield batch

    monkeypatch.setattr(EvalData, "batches", tracked)
    frame = profile_model(model, data, ProfileConfig.of(batches=12, batch_size=1, seq_len=4))
    assert len(refs) == 12  # one pass: the statistics and importance read the same forward
    assert max(alive) <= 1
    assert len(frame) > 0


def test_steps_of_a_run_share_one_folder(run, short_text, tmp_path) -> None:
    seen = []
    out = tmp_path / "out"
    dest = profile_many([run], out, ProfileConfig.of(data=short_text, batches=1, batch_size=2, seq_len=SEQ,
                                                     device="cpu"), callback=seen.append)
    assert dest == [out / "myrun"]
    frame = load_run(dest[0])
    assert sorted(frame["step"].unique()) == [2, 4]
    per_step = frame.groupby("step").size()
    assert per_step[2] == per_step[4]
    batches = [e for e in seen if e.phase == "profile"]
    assert [e.completed for e in batches] == [1, 2] and {e.total for e in batches} == {2}  # one pass per checkpoint
    assert [e.step for e in batches] == [2, 4]
    # what is under way is told before each part starts: the data, then each checkpoint's loading
    assert [(e.phase, e.completed) for e in seen if e.phase != "profile"] == [
        ("data", 0), ("loading", 0), ("data", 0), ("loading", 1), ("data", 1)]
    assert seen[0].total == 0 and seen[1].total == 2
    assert [p.name for p in out.iterdir()] == ["myrun"]  # no temporary folder left behind
    # a step checkpoint joins its run's folder; --latest and a run folder take the last step only
    groups = checkpoint_groups([run / "checkpoints" / "step_000002", run], latest=True)
    assert {k: [p.name for p in v] for k, v in groups.items()} == {"myrun": ["step_000002", "step_000004"]}
    with pytest.raises(FileExistsError, match="already exists"):
        profile_checkpoint(run, out, ProfileConfig.of(data=short_text))
    one = profile_checkpoint(run, out, ProfileConfig.of(data=short_text, batches=1, batch_size=2, seq_len=SEQ,
                                                        importance=False), overwrite=True, run_id="latest")
    frame = load_run(one)
    assert set(frame["step"]) == {4} and "importance" not in set(frame["site"])
    assert frame.query("stat == 'val_loss'").shape[0] == 1


def test_folder_of_step_checkpoints_and_name_clashes(run, short_text, tmp_path) -> None:
    steps = tmp_path / "steps"
    for ckpt in step_checkpoints(run):
        shutil.copytree(ckpt, steps / ckpt.name, ignore=shutil.ignore_patterns("trainer_state.pt"))
    dest = profile_many([steps], tmp_path / "out", ProfileConfig.of(data=short_text, batches=1, batch_size=1,
                                                                    seq_len=8, activations=False))[0]
    frame = load_run(dest)
    assert dest.name == "steps" and sorted(frame["step"].unique()) == [2, 4]
    assert set(frame["site"]) - {"importance", "model"} == {f"angular_n{n}" for n in range(1, 5)}
    other = tmp_path / "elsewhere" / "steps"
    shutil.copytree(steps, other)
    with pytest.raises(ValueError, match="would both be profiled as run 'steps'"):
        checkpoint_groups([steps, other])
    with pytest.raises(ValueError, match="no CUDA device|unknown device"):
        profile_many([steps], tmp_path / "o2", ProfileConfig.of(
            data=short_text, device="cuda:0" if not torch.cuda.is_available() else "nonsense"))
    with pytest.raises(ValueError, match="nothing to profile"):
        profile_many([steps], tmp_path / "o2", ProfileConfig.of(importance=False, activations=False))
    with pytest.raises(ValueError, match="invalid run id"):
        profile_many([steps], tmp_path / "o2", run_id="a/b")
    (tmp_path / "o2" / "steps").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a profile folder"):
        profile_many([steps], tmp_path / "o2", overwrite=True)


# ---------------------------------------------------------------------------- Hugging Face + tokenizer


def test_hf_checkpoint_with_its_tokenizer(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    text = words_text(40, seed=1)
    tok = word_tokenizer(text)
    vocab = tok.get_vocab_size()
    ckpt = tmp_path / "hf-llama"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(ckpt)
    tok.save(str(ckpt / "tokenizer.json"))
    (tmp_path / "eval.txt").write_text(text)

    dest = profile_checkpoint(ckpt, tmp_path / "out", ProfileConfig.of(data=tmp_path / "eval.txt", batches=2,
                                                                       batch_size=2, seq_len=SEQ, device="cpu"))
    frame = load_run(dest)
    assert dest.name == "hf-llama" and set(frame["step"]) == {0}  # the step is unknown
    assert json.loads((dest / PROFILE_FILE).read_text())["checkpoints"][0]["tokenizer"] == str(ckpt / "tokenizer.json")
    ids = torch.tensor(tok.encode(text, add_special_tokens=False).ids)
    full = (len(ids) - 1) // SEQ  # 4 windows of the full ones, evenly spread
    starts = [i * full // 4 * SEQ for i in range(4)]
    x = torch.stack([ids[s:s + SEQ] for s in starts])
    y = torch.stack([ids[s + 1:s + SEQ + 1] for s in starts])
    with torch.no_grad():
        ref = F.cross_entropy(hf(input_ids=x).logits.flatten(0, 1).float(), y.flatten())
    got = frame.query("stat == 'val_loss'")["value"]
    assert len(got) == 1 and got.iloc[0] == pytest.approx(float(ref), rel=1e-5)
    assert frame.query("site == 'resid_post' and direction == 'bwd'")["layer"].nunique() == 2

    big = tmp_path / "small-vocab"
    cfg.vocab_size = vocab - 1
    transformers.LlamaForCausalLM(cfg).save_pretrained(big)
    tok.save(str(big / "tokenizer.json"))
    with pytest.raises(ValueError, match="does not match the model"):
        profile_checkpoint(big, tmp_path / "out", ProfileConfig.of(data=tmp_path / "eval.txt"))
    assert not (tmp_path / "out" / "small-vocab").exists()
