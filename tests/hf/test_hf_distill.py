"""Transformer distillation: layer-dropped students, hidden-state matching, unlabelled text windows, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import torchslim as ts
from torchslim.distill import distill
from torchslim.errors import ConfigError, ModelError
from torchslim.hf import drop_layers, hidden_pairs, kept_layers, layer_list, set_dropout_, text_dataset

from .conftest import TEXTS

FAST = ts.TrainConfig(epochs=6, lr=1e-3, optimizer="adamw", batch_size=4)


def _gap(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(F.mse_loss(student(ids), teacher(ids)))


def test_drop_layers_keeps_teacher_weights_and_survives_save_load(gpt2_dir, tmp_path):
    teacher = ts.load_hf(gpt2_dir)
    student = drop_layers(teacher, [1])
    assert teacher.config.n_layer == 2 and len(teacher.model.transformer.h) == 2  # the teacher is unchanged
    assert student.config.n_layer == 1 and layer_list(student)[0] == "model.transformer.h"
    block = student.model.transformer.h[0]
    assert torch.equal(block.mlp.c_fc.weight, teacher.model.transformer.h[1].mlp.c_fc.weight)
    assert block.attn.layer_idx == 0 and kept_layers(student) == [1]
    ids, mask = ts.hf.encode(teacher, TEXTS)
    path = ts.save(student, tmp_path / "one-layer.slim")
    assert ts.read_manifest(path)["factory"]["kwargs"]["layers"] == [1]
    assert path.stat().st_size < 0.8 * ts.save(teacher, tmp_path / "teacher.slim").stat().st_size
    loaded = ts.load(path)
    assert loaded.config.n_layer == 1 and torch.equal(loaded(ids, mask), student(ids, mask))


def test_drop_layers_moves_pruned_head_counts_and_composes(bert_dir, tmp_path):
    teacher = ts.load_hf(bert_dir)
    ids, mask = ts.hf.encode(teacher, TEXTS)
    pruned = copy.deepcopy(teacher)
    ts.prune_transformer_(pruned, ts.ChannelPruning(amount=0.5, heads=0.5), (ids, mask))
    student = drop_layers(pruned, "1")
    kwargs = ts.models.factory_of(student)["kwargs"]
    assert kwargs["layers"] == [1] and kwargs["heads"] == {"model.encoder.layer.0.attention.self": 2}
    loaded = ts.load(ts.save(student, tmp_path / "s.slim"))
    assert loaded.model.encoder.layer[0].attention.self.num_attention_heads == 2
    assert torch.equal(loaded(ids, mask), student(ids, mask))
    # student layer 0 (teacher layer 1) is the last layer: matched to the teacher's last layer
    assert hidden_pairs(student, teacher) == ("model.encoder.layer.1:model.encoder.layer.0",)


def test_hidden_pairs_match_the_layer_before_the_next_kept_one(bert_dir):
    teacher = ts.load_hf(bert_dir)
    assert hidden_pairs(drop_layers(teacher, [0]), teacher) == ("model.encoder.layer.1:model.encoder.layer.0",)
    same = ("model.encoder.layer.0:model.encoder.layer.0", "model.encoder.layer.1:model.encoder.layer.1")
    assert hidden_pairs(copy.deepcopy(teacher), teacher) == same


@pytest.mark.parametrize(
    ("keep", "message"),
    [([2], r"layers = \[2\] is invalid: index 2 is outside \[0, 2\)"), ([0, 0], "at most once"),
     ("first", "expected 'every-other' or comma-separated"), ([], "at least one")],
)
def test_drop_layers_errors(bert_dir, keep, message):
    with pytest.raises(ConfigError, match=message):
        drop_layers(ts.load_hf(bert_dir), keep)


def test_drop_layers_needs_an_hf_model():
    with pytest.raises(ModelError, match="load_hf"):
        drop_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=r"dropout = 1.0 is invalid: expected a number in \[0, 1\)"):
        set_dropout_(torch.nn.Dropout(), 1.0)


def test_text_dataset_packs_tokens_without_padding(bert_dir):
    model = ts.load_hf(bert_dir)
    data = text_dataset(model, TEXTS, seq_len=8)
    ids, targets = data.tensors
    stream = [i for text in model.tokenizer(TEXTS)["input_ids"] for i in text]
    assert ids.shape == (-(-len(stream) // 8), 8) and ids.dtype == torch.int64
    assert ids.flatten()[: len(stream)].tolist() == stream  # every token once, in order
    assert ids.flatten()[len(stream):].tolist() == stream[: ids.numel() - len(stream)]  # wraps, no padding
    assert targets.is_floating_point() and not targets.any()
    assert text_dataset(model, ["a cat"], seq_len=64).tensors[0].shape == (1, 4)  # [CLS] a cat [SEP]
    assert len(text_dataset(model, TEXTS, seq_len=8, max_windows=2)) == 2
    with pytest.raises(ConfigError, match="seq_len = 65 is invalid: expected at most 64"):
        text_dataset(model, TEXTS, seq_len=65)
    with pytest.raises(ConfigError, match="seq_len = 1 is invalid"):
        text_dataset(model, TEXTS, seq_len=1)


def test_kd_output_loss_field_is_validated():
    with pytest.raises(ConfigError, match="KD.output_loss = 'l1' is invalid: expected one of 'kl', 'mse', 'cosine'"):
        ts.KD(output_loss="l1")
    assert ts.KD.from_dict(ts.KD(output_loss="mse").to_dict()).output_loss == "mse"


def test_distill_layer_dropped_narrower_bert_on_text_hidden_states(bert_dir, tmp_path):
    torch.manual_seed(0)
    teacher = ts.load_hf(bert_dir)
    student = drop_layers(teacher, "every-other")
    data = text_dataset(teacher, TEXTS * 3, seq_len=8)
    ts.prune_transformer_(student, ts.ChannelPruning(amount=0.5), data.tensors[0][:2])
    assert set_dropout_(student, 0.0) > 0  # dropout noise would swamp the small gap to the teacher
    ids = data.tensors[0]
    before = _gap(student, teacher, ids)
    kd = ts.KD(alpha=1.0, output_loss="mse", features=hidden_pairs(student, teacher))
    distill(student, teacher, data, kd, train_config=FAST, progress=False)
    after = _gap(student, teacher, ids)
    assert after < 0.7 * before
    loaded = ts.load(ts.save(student, tmp_path / "distilled.slim"))
    assert torch.equal(loaded(ids), student(ids)) and loaded.config.num_hidden_layers == 1


def test_distill_gpt2_per_token_kl_and_labels_refused(gpt2_dir):
    torch.manual_seed(0)
    teacher = ts.load_hf(gpt2_dir)
    student = drop_layers(teacher, [0])
    set_dropout_(student)
    data = text_dataset(teacher, TEXTS * 3, seq_len=8)
    ids = data.tensors[0]

    def kl() -> float:
        with torch.no_grad():
            s, t = student(ids).flatten(0, 1), teacher(ids).flatten(0, 1)
            return float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean"))

    before = kl()
    distill(student, teacher, data, ts.KD(alpha=1.0, temperature=1.0), train_config=FAST, progress=False)
    assert kl() < 0.7 * before
    with pytest.raises(ConfigError, match="alpha = 0.5 needs labelled targets"):
        distill(student, teacher, data, ts.KD(alpha=0.5), train_config=FAST, progress=False)
    with pytest.raises(ConfigError, match="KD.alpha = 0.5 needs labelled targets"):
        distill(student, teacher, data, ts.KD(alpha=0.5, output_loss="mse"), train_config=FAST, progress=False)
