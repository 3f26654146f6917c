"""Tiny architectures for the coverage table: Hugging Face configs with random weights, torchslim's CNNs, user modules.

Every architecture is built from a config (2 layers, hidden 32, vocabulary 128, 32x32 images): nothing is
downloaded. Text models that :class:`~torchslim.hf.loading.HFModel` can wrap are written with ``save_pretrained``
and loaded with ``ts.load_hf`` (factory ``hf:DIR``), as a user would. The others (vision, audio, T5's separate
decoder ids, user-style modules) are wrapped here the way a user would wrap them: a module whose ``forward`` takes
tensors and returns one tensor, built by :func:`build` (``torchslim.coverage.zoo:build``, a factory outside the
allowlist, so ``ts.load(..., trust_factory=True)``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchslim.errors import ModelError
from torchslim.hf import load_hf
from torchslim.hf.loading import _quiet
from torchslim.models import create_model

__all__ = ["ARCHITECTURES", "Arch", "build", "example_inputs", "make"]

VOCAB = 128
SEQ = 8
IMAGE = 32
FACTORY = "torchslim.coverage.zoo:build"
_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "vocab_size": VOCAB, "max_position_embeddings": 64}
_DECODER = {**_TEXT, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": False}


@dataclasses.dataclass(frozen=True)
class Arch:
    """One row of the table.

    Attributes:
        name: row label.
        family: ``encoder``, ``decoder``, ``encoder-decoder``, ``vision``, ``audio``, ``torchslim``, ``user``.
        inputs: ``tokens`` (int64 ids + mask), ``tokens2`` (encoder ids + decoder ids), ``ids`` (ids only) or
            ``float`` (one float tensor of ``shape``).
        how: how the model reaches torchslim (``ts.load_hf``, a user wrapper, ``ts.create_model``).
        shape: one sample's float input shape (``float`` inputs).
        classes: number of classes of a classifier head (labels for distillation), 0 for token/hidden outputs.
    """

    name: str
    family: str
    inputs: str
    how: str
    shape: tuple[int, ...] = ()
    classes: int = 0


def _hf_text(cls: str, **overrides: Any) -> Callable[[], nn.Module]:
    def make_hf() -> nn.Module:
        import transformers

        model_cls = getattr(transformers, cls)
        config = model_cls.config_class(**{**_TEXT, **overrides})
        config._attn_implementation = "eager"
        return model_cls(config)

    return make_hf


# name -> (Arch, builder of the transformers model) for models that ts.load_hf takes
_HF_TEXT: dict[str, tuple[Arch, Callable[[], nn.Module]]] = {}


def _text(name: str, family: str, cls: str, classes: int = 0, **overrides: Any) -> None:
    inputs = "tokens"
    arch = Arch(name, family, inputs, f"ts.load_hf ({cls})", classes=classes)
    extra = {"num_labels": classes} if classes else {}
    _HF_TEXT[name] = (arch, _hf_text(cls, **extra, **overrides))


_text("bert", "encoder", "BertForSequenceClassification", 4)
_text("distilbert", "encoder", "DistilBertForSequenceClassification", 4, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
_text("roberta", "encoder", "RobertaForSequenceClassification", 4, pad_token_id=1, bos_token_id=0, eos_token_id=2)
_text("albert", "encoder", "AlbertForSequenceClassification", 4, embedding_size=16)
_text("electra", "encoder", "ElectraForSequenceClassification", 4, embedding_size=16)
_text("deberta-v2", "encoder", "DebertaV2ForSequenceClassification", 4)
_text("gpt2", "decoder", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=2, n_positions=64, n_inner=64)
_text("gpt-neo", "decoder", "GPTNeoForCausalLM", num_layers=2, attention_types=[[["global", "local"], 1]],
      num_heads=2, window_size=4)
_text("opt", "decoder", "OPTForCausalLM", ffn_dim=64, word_embed_proj_dim=32, enable_bias=True)
_text("llama", "decoder", "LlamaForCausalLM", **_DECODER)
_text("mistral", "decoder", "MistralForCausalLM", **_DECODER, sliding_window=None)
_text("qwen2", "decoder", "Qwen2ForCausalLM", **_DECODER)
_text("phi", "decoder", "PhiForCausalLM", num_attention_heads=4, partial_rotary_factor=0.5)
_text("gemma", "decoder", "GemmaForCausalLM", **_DECODER)
_text("bart", "encoder-decoder", "BartForConditionalGeneration", d_model=32, encoder_layers=1, decoder_layers=1,
      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)


class TensorOutput(nn.Module):
    """A user's wrapper: a ``transformers`` model behind ``forward(x) -> tensor`` (vision, audio, encoders).

    Args:
        model: the wrapped model.
        input_name: the keyword the wrapped model takes (``pixel_values``, ``input_values``, ``input_features``).
        output: the attribute of its output returned (``logits`` or ``last_hidden_state``).
    """

    def __init__(self, model: nn.Module, input_name: str, output: str) -> None:
        super().__init__()
        self.model = model
        self.input_name = input_name
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.model(**{self.input_name: x}, return_dict=True), self.output)


class Seq2Seq(nn.Module):
    """A user's wrapper of T5: ``forward(input_ids, decoder_input_ids) -> logits`` (HFModel passes no decoder ids)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, return_dict=True).logits


def _hf_config(cls: str, **kwargs: Any) -> Any:
    import transformers

    config = getattr(transformers, cls)(**kwargs)
    config._attn_implementation = "eager"
    return config


def _vision(cls: str, config_cls: str, **kwargs: Any) -> nn.Module:
    import transformers

    config = _hf_config(config_cls, num_labels=10, **kwargs)
    return TensorOutput(getattr(transformers, cls)(config), "pixel_values", "logits")


_VIT = {"image_size": IMAGE, "patch_size": 8, "num_channels": 3, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64}


def _t5() -> nn.Module:
    import transformers

    config = _hf_config("T5Config", vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                        num_decoder_layers=1, num_heads=2, decoder_start_token_id=0)
    return Seq2Seq(transformers.T5ForConditionalGeneration(config))


def _whisper_encoder() -> nn.Module:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = _hf_config("WhisperConfig", num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                        encoder_ffn_dim=64, max_source_positions=16, vocab_size=VOCAB)
    return TensorOutput(WhisperEncoder(config), "input_features", "last_hidden_state")


def _wav2vec2() -> nn.Module:
    import transformers

    config = _hf_config("Wav2Vec2Config", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_labels=4,
                        classifier_proj_size=16, do_stable_layer_norm=True, feat_extract_norm="layer",
                        mask_time_prob=0.0)
    return TensorOutput(transformers.Wav2Vec2ForSequenceClassification(config), "input_values", "logits")


class GroupedConvNet(nn.Module):
    """User CNN with a grouped conv (groups=4), a depthwise conv and BatchNorm, 3 x 32 x 32 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 32, 1), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.depthwise(self.grouped(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class Conv1dNet(nn.Module):
    """User 1-D CNN over 4 x 64 signals -> 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv1d(4, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 32, 3, stride=2),
                                   nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.convs(x).mean(dim=2))


class TwoInputNet(nn.Module):
    """User model whose ``forward`` takes an image and a feature vector: 3 x 32 x 32 and 12 features -> 6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.features = nn.Linear(12, 16)
        self.head = nn.Linear(32, 6)

    def forward(self, image: Tensor, features: Tensor) -> Tensor:
        pooled = self.conv(image).mean(dim=(2, 3))
        return self.head(torch.cat([pooled, torch.relu(self.features(features))], dim=1))


class TiedLM(nn.Module):
    """User language model whose output layer shares the embedding's weight (tied weights): ids -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed(input_ids)
        return self.out(self.norm(h + self.mlp(h)))


class AttentionNet(nn.Module):
    """User model with ``nn.MultiheadAttention`` over 8 x 32 float sequences -> 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.ffn(h)
        return self.head(h.mean(dim=1))


# name -> (Arch, builder) for models built by build(): the user's own factory
_BUILT: dict[str, tuple[Arch, Callable[[], nn.Module]]] = {
    "t5": (Arch("t5", "encoder-decoder", "tokens2", "user wrapper (T5ForConditionalGeneration + decoder ids)"), _t5),
    "vit": (Arch("vit", "vision", "float", "user wrapper (ViTForImageClassification)", (3, IMAGE, IMAGE), 10),
            lambda: _vision("ViTForImageClassification", "ViTConfig", **_VIT)),
    "deit": (Arch("deit", "vision", "float", "user wrapper (DeiTForImageClassification)", (3, IMAGE, IMAGE), 10),
             lambda: _vision("DeiTForImageClassification", "DeiTConfig", **_VIT)),
    "swin": (Arch("swin", "vision", "float", "user wrapper (SwinForImageClassification)", (3, IMAGE, IMAGE), 10),
             lambda: _vision("SwinForImageClassification", "SwinConfig", image_size=IMAGE, patch_size=4,
                             embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)),
    "convnext": (Arch("convnext", "vision", "float", "user wrapper (ConvNextForImageClassification)",
                      (3, IMAGE, IMAGE), 10),
                 lambda: _vision("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[16, 32],
                                 depths=[1, 1], num_stages=2, patch_size=2)),
    "resnet-hf": (Arch("resnet-hf", "vision", "float", "user wrapper (ResNetForImageClassification)",
                       (3, IMAGE, IMAGE), 10),
                  lambda: _vision("ResNetForImageClassification", "ResNetConfig", embedding_size=16,
                                  hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")),
    "mobilenet-v2": (Arch("mobilenet-v2", "vision", "float", "user wrapper (MobileNetV2ForImageClassification)",
                          (3, IMAGE, IMAGE), 10),
                     lambda: _vision("MobileNetV2ForImageClassification", "MobileNetV2Config", image_size=IMAGE,
                                     depth_multiplier=0.25, min_depth=8, initializer_range=0.2)),
    "efficientnet": (Arch("efficientnet", "vision", "float", "user wrapper (EfficientNetForImageClassification)",
                          (3, IMAGE, IMAGE), 10),
                     lambda: _vision("EfficientNetForImageClassification", "EfficientNetConfig", image_size=IMAGE,
                                     width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
                                     initializer_range=0.2)),
    "wav2vec2": (Arch("wav2vec2", "audio", "float", "user wrapper (Wav2Vec2ForSequenceClassification)", (800,), 4),
                 _wav2vec2),
    "whisper-encoder": (Arch("whisper-encoder", "audio", "float", "user wrapper (WhisperEncoder)", (8, 32)),
                        _whisper_encoder),
    "grouped-conv": (Arch("grouped-conv", "user", "float", "user module (grouped + depthwise Conv2d)",
                          (3, IMAGE, IMAGE), 10), GroupedConvNet),
    "conv1d": (Arch("conv1d", "user", "float", "user module (Conv1d)", (4, 64), 5), Conv1dNet),
    "two-inputs": (Arch("two-inputs", "user", "float2", "user module (forward(image, features))",
                        (3, IMAGE, IMAGE), 6), TwoInputNet),
    "tied-weights": (Arch("tied-weights", "user", "ids", "user module (embedding tied to the output layer)"), TiedLM),
    "multihead-attention": (Arch("multihead-attention", "user", "float", "user module (nn.MultiheadAttention)",
                                 (SEQ, 32), 4), AttentionNet),
}

# torchslim's own CNNs, by registry name
_OWN: dict[str, Arch] = {
    "lenet5": Arch("lenet5", "torchslim", "float", "ts.create_model('lenet5')", (1, 28, 28), 10),
    "resnet": Arch("resnet", "torchslim", "float", "ts.create_model('resnet')", (1, 28, 28), 10),
    "student_cnn": Arch("student_cnn", "torchslim", "float", "ts.create_model('student_cnn')", (1, 28, 28), 10),
}

ARCHITECTURES: dict[str, Arch] = {
    **{name: arch for name, (arch, _) in _HF_TEXT.items()},
    **{name: arch for name, (arch, _) in _BUILT.items()},
    **_OWN,
}


def build(arch: str) -> nn.Module:
    """The user factory of the wrapped architectures (``torchslim.coverage.zoo:build``), random weights.

    Args:
        arch: a name of a wrapped or user-style architecture (see ``ARCHITECTURES``).

    Returns:
        The module in eval mode.

    Raises:
        ModelError: an unknown name.
    """
    if arch not in _BUILT:
        raise ModelError(f"coverage zoo: arch = {arch!r} is not built by this factory: expected one of "
                         f"{', '.join(sorted(_BUILT))}")
    return _BUILT[arch][1]().eval()


def make(name: str, workdir: str | Path | None = None, seed: int = 0) -> nn.Module:
    """Build architecture ``name`` as a user would hand it to torchslim, with its factory recorded for ``ts.save``.

    Args:
        name: a key of ``ARCHITECTURES``.
        workdir: where ``save_pretrained`` writes text models for ``ts.load_hf`` (kept: the ``.slim`` factory
            ``hf:DIR`` points there); default: a new temporary directory.
        seed: random-weight seed.

    Returns:
        The fp32 model in eval mode.

    Raises:
        ModelError: an unknown name.
    """
    if name not in ARCHITECTURES:
        raise ModelError(f"coverage zoo: arch = {name!r} is unknown: expected one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    if name in _OWN:
        return create_model(name).eval()
    if name in _BUILT:
        return create_model(FACTORY, arch=name).eval()

    directory = Path(workdir or tempfile.mkdtemp(prefix="torchslim-zoo-")) / name
    with _quiet():
        _HF_TEXT[name][1]().save_pretrained(directory)
    return load_hf(directory)


def example_inputs(arch: Arch, batch: int = 2, seed: int = 0) -> tuple[Tensor, ...]:
    """Inputs of one batch for ``arch`` (a tuple, passed positionally)."""
    generator = torch.Generator().manual_seed(seed)
    if arch.inputs in ("tokens", "tokens2", "ids"):
        ids = torch.randint(3, VOCAB, (batch, SEQ), generator=generator)
        if arch.inputs == "ids":
            return (ids,)
        if arch.inputs == "tokens2":
            return ids, torch.randint(3, VOCAB, (batch, SEQ), generator=generator)
        return ids, torch.ones(batch, SEQ, dtype=torch.long)
    x = torch.randn(batch, *arch.shape, generator=generator)
    if arch.inputs == "float2":
        return x, torch.randn(batch, 12, generator=generator)
    return (x,)
