"""Tiny, seeded model zoo that every technique's contract test runs on.

Each entry of :data:`ZOO` is a zero-argument factory returning ``(model, example_inputs)``:

* the model is built under ``torch.manual_seed(0)`` and returned in eval mode, so two calls give
  bit-identical weights;
* example inputs come from a local :class:`torch.Generator` (the global RNG is never consumed for
  them), so they are identical across calls too;
* every model is tiny (well under 300k parameters, a forward pass of a few milliseconds on CPU) but
  has the structure of the real architecture it stands in for.

:data:`TOKEN_INPUT_MODELS` names the entries whose inputs are token ids: their dim 0 is the batch and
dim 1 a sequence length, so both may be made dynamic on export. Every other entry only has a dynamic
batch dim.

Transformers models are built from config objects only (nothing is downloaded) and wrapped in small
module-level classes whose ``forward`` returns a plain tensor, which is what ``torch.onnx.export``
and onnxruntime comparisons want.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Factory = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]

_SEED = 0
_BATCH = 2


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(_SEED)


def _finish(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, then switch to eval mode.

    Freshly initialised BatchNorm has mean 0 / var 1 / weight 1 / bias 0, i.e. it is the identity
    in eval mode, which would let a broken BN-folding or BN-handling technique pass unnoticed.
    """
    g = torch.Generator().manual_seed(_SEED + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# resnet_cnn
# --------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 Conv-BN, ReLU, identity or strided 1x1 Conv-BN projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem Conv-BN-ReLU, an identity basic block, a strided projection block, GAP, Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.layer1 = BasicBlock(16, 16, stride=1)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Small residual CNN (Conv2d+BatchNorm2d+ReLU, 2 residual blocks, one with a strided 1x1
    projection shortcut, global average pool, Linear). Input float (2, 3, 32, 32) -> logits (2, 10)."""
    torch.manual_seed(_SEED)
    model = _finish(TinyResNet())
    x = torch.randn(_BATCH, 3, 32, 32, generator=_gen())
    return model, (x,)


# --------------------------------------------------------------------------------------------------
# inverted_residual_cnn
# --------------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (Conv-BN-ReLU6), 3x3 depthwise (Conv-BN-ReLU6), 1x1 linear
    project (Conv-BN), residual add when stride is 1 and channels match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        self.expand = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.use_residual:
            out = out + x
        return out


class TinyMobileNetV2(nn.Module):
    """Stem Conv-BN-ReLU6, four inverted residual blocks (two with residuals), 1x1 head, GAP, Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
        )
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, stride=1, expand=4),  # residual
            InvertedResidual(16, 24, stride=2, expand=4),
            InvertedResidual(24, 24, stride=1, expand=4),  # residual
            InvertedResidual(24, 32, stride=2, expand=4),
        )
        self.head = nn.Sequential(
            nn.Conv2d(32, 64, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU6(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def inverted_residual_cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """MobileNetV2-style CNN: inverted residual blocks (1x1 expand, 3x3 depthwise with
    groups=channels, 1x1 linear project, residual when shapes match), BatchNorm, ReLU6.
    Input float (2, 3, 32, 32) -> logits (2, 10)."""
    torch.manual_seed(_SEED)
    model = _finish(TinyMobileNetV2())
    x = torch.randn(_BATCH, 3, 32, 32, generator=_gen())
    return model, (x,)


# --------------------------------------------------------------------------------------------------
# bert_encoder
# --------------------------------------------------------------------------------------------------


class BertEncoderWrapper(nn.Module):
    """Wraps a ``transformers.BertModel``; ``forward(input_ids, attention_mask)`` returns
    ``last_hidden_state`` as a plain tensor."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state


def bert_encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Tiny BERT encoder (hidden 64, 2 layers, 4 heads, FFN 128, vocab 1000, 128 positions, eager
    attention, no pooler). Inputs int64 input_ids (2, 16) and attention_mask (2, 16), row 1 padded
    after 11 tokens -> last_hidden_state (2, 16, 64)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(_SEED)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model = BertEncoderWrapper(BertModel(config, add_pooling_layer=False)).eval()
    input_ids = torch.randint(1, 1000, (_BATCH, 16), generator=_gen(), dtype=torch.int64)
    attention_mask = torch.ones(_BATCH, 16, dtype=torch.int64)
    attention_mask[1, 11:] = 0
    input_ids[1, 11:] = config.pad_token_id
    return model, (input_ids, attention_mask)


# --------------------------------------------------------------------------------------------------
# gpt_decoder
# --------------------------------------------------------------------------------------------------


class CausalLMWrapper(nn.Module):
    """Wraps a ``transformers`` causal LM; ``forward(input_ids)`` returns logits as a plain tensor,
    with the KV cache disabled."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.lm(input_ids=input_ids, use_cache=False, return_dict=True)
        return out.logits


def gpt_decoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Tiny Llama decoder with grouped-query attention (hidden 64, 2 layers, 4 query heads, 2 KV
    heads, FFN 128, vocab 1000, RoPE, RMSNorm, SwiGLU, eager attention, no KV cache). Input int64
    input_ids (2, 16) -> logits (2, 16, 1000)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(_SEED)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="eager",
    )
    model = CausalLMWrapper(LlamaForCausalLM(config)).eval()
    input_ids = torch.randint(0, 1000, (_BATCH, 16), generator=_gen(), dtype=torch.int64)
    return model, (input_ids,)


# --------------------------------------------------------------------------------------------------
# lstm_classifier / gru_classifier
# --------------------------------------------------------------------------------------------------


class LSTMClassifier(nn.Module):
    """Embedding -> 1-layer batch-first LSTM -> Linear on the last layer's final hidden state."""

    def __init__(self, vocab: int = 1000, embed: int = 32, hidden: int = 64, num_classes: int = 5) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=1, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(self.embedding(tokens))
        return self.fc(h_n[-1])


def lstm_classifier() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Embedding(1000, 32) -> 1-layer batch-first LSTM(64) -> Linear(5) on the last hidden state.
    Input int64 tokens (2, 12) -> logits (2, 5)."""
    torch.manual_seed(_SEED)
    model = LSTMClassifier().eval()
    tokens = torch.randint(0, 1000, (_BATCH, 12), generator=_gen(), dtype=torch.int64)
    return model, (tokens,)


class GRUClassifier(nn.Module):
    """1-layer batch-first GRU over float features -> Linear on the final hidden state."""

    def __init__(self, features: int = 16, hidden: int = 64, num_classes: int = 5) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, num_layers=1, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h_n = self.gru(x)
        return self.fc(h_n[-1])


def gru_classifier() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """1-layer batch-first GRU(16 -> 64) -> Linear(5) on the last hidden state, no embedding.
    Input float features (2, 12, 16) -> logits (2, 5)."""
    torch.manual_seed(_SEED)
    model = GRUClassifier().eval()
    x = torch.randn(_BATCH, 12, 16, generator=_gen())
    return model, (x,)


# --------------------------------------------------------------------------------------------------
# dcgan_generator
# --------------------------------------------------------------------------------------------------


class DCGANGenerator(nn.Module):
    """DCGAN generator: latent (N, nz, 1, 1) -> ConvTranspose2d-BN-ReLU stages (1 -> 4 -> 8) ->
    ConvTranspose2d (8 -> 16) -> Tanh image (N, 3, 16, 16)."""

    def __init__(self, nz: int = 16, ngf: int = 32, channels: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 2, 4, stride=1, padding=0, bias=False),  # 1 -> 4
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, stride=2, padding=1, bias=False),  # 4 -> 8
            nn.BatchNorm2d(ngf),
            nn.ReLU(),
            nn.ConvTranspose2d(ngf, channels, 4, stride=2, padding=1, bias=False),  # 8 -> 16
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def dcgan_generator() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """DCGAN-style generator: latent (2, 16, 1, 1) -> ConvTranspose2d+BatchNorm+ReLU stages ->
    ConvTranspose2d -> Tanh, output image (2, 3, 16, 16) in [-1, 1]."""
    torch.manual_seed(_SEED)
    model = _finish(DCGANGenerator())
    z = torch.randn(_BATCH, 16, 1, 1, generator=_gen())
    return model, (z,)


# --------------------------------------------------------------------------------------------------
# dense_unet
# --------------------------------------------------------------------------------------------------


class DenseUNet(nn.Module):
    """A UNet with a DenseNet-style block: encoder conv-BN-ReLU, a dense block whose layers read the
    concatenation of everything before them, a strided down conv, a ConvTranspose up, the skip
    concatenated with the upsampled map, and a 1x1 head -> (N, 2, 16, 16) segmentation logits."""

    def __init__(self, width: int = 16, growth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.dense1 = nn.Sequential(nn.Conv2d(width, growth, 3, padding=1), nn.BatchNorm2d(growth), nn.ReLU())
        self.dense2 = nn.Sequential(
            nn.Conv2d(width + growth, growth, 3, padding=1), nn.BatchNorm2d(growth), nn.ReLU()
        )
        skip = width + 2 * growth
        self.down = nn.Sequential(nn.Conv2d(skip, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.fuse = nn.Sequential(nn.Conv2d(skip + width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.dense1(x)], dim=1)
        skip = torch.cat([x, self.dense2(x)], dim=1)  # (N, width + 2 * growth, H, W)
        up = self.up(self.down(skip))
        return self.head(self.fuse(torch.cat([skip, up], dim=1)))


def dense_unet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """UNet with a dense block (concatenations along channels, a strided conv down, a transposed conv
    up). Input (2, 3, 16, 16) -> logits (2, 2, 16, 16)."""
    torch.manual_seed(_SEED)
    model = _finish(DenseUNet())
    return model, (torch.randn(_BATCH, 3, 16, 16, generator=_gen()),)


# --------------------------------------------------------------------------------------------------
# vit_encoder
# --------------------------------------------------------------------------------------------------


class ViTWrapper(nn.Module):
    """Wraps a ``transformers.ViTModel``; ``forward(pixel_values)`` returns the [CLS] token's state."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=pixel_values, return_dict=True).last_hidden_state[:, 0]


def vit_encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Tiny ViT (image 32, patches of 8, hidden 64, 2 layers, 4 heads, FFN 128, eager attention, no
    pooler). Input (2, 3, 32, 32) -> [CLS] state (2, 64)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(_SEED)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model = ViTWrapper(ViTModel(config, add_pooling_layer=False)).eval()
    return model, (torch.randn(_BATCH, 3, 32, 32, generator=_gen()),)


# --------------------------------------------------------------------------------------------------

ZOO: dict[str, Factory] = {
    "resnet_cnn": resnet_cnn,
    "inverted_residual_cnn": inverted_residual_cnn,
    "bert_encoder": bert_encoder,
    "gpt_decoder": gpt_decoder,
    "lstm_classifier": lstm_classifier,
    "gru_classifier": gru_classifier,
    "dcgan_generator": dcgan_generator,
    "dense_unet": dense_unet,
    "vit_encoder": vit_encoder,
}

#: Entries whose inputs are int64 token ids of shape (batch, seq): dim 1 is a sequence length.
TOKEN_INPUT_MODELS: set[str] = {"bert_encoder", "gpt_decoder", "lstm_classifier"}


# --------------------------------------------------------------------------------------------------
# The wider zoo: architectures a stranger brings, as they come (raw Hugging Face models returning
# ModelOutput, GPT-2's Conv1D, windowed attention, bottlenecks, MoE, recurrent speech models).
# --------------------------------------------------------------------------------------------------


def _ids(vocab: int, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (_BATCH, seq), generator=_gen(), dtype=torch.int64)


def gpt2_lm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """GPT2LMHeadModel as transformers builds it (Conv1D projections, tied head, returns a ModelOutput).
    Input input_ids (2, 16) -> logits (2, 16, 1000)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(_SEED)
    config = GPT2Config(
        vocab_size=1000,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).eval(), (_ids(1000),)


def whisper_encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Whisper-style audio classifier: Conv1d stem over log-mel features, a transformer encoder, a
    projector and classifier (WhisperForAudioClassification). Input input_features (2, 16, 64) -> logits."""
    from transformers import WhisperConfig, WhisperForAudioClassification

    torch.manual_seed(_SEED)
    config = WhisperConfig(
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        max_source_positions=32,
        max_target_positions=32,
        classifier_proj_size=32,
        num_labels=4,
        attn_implementation="eager",
    )
    model = WhisperForAudioClassification(config).eval()
    return model, (torch.randn(_BATCH, 16, 64, generator=_gen()),)


def swin_classifier() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Swin (windowed, shifted attention with relative position bias, patch merging). Input (2, 3, 32, 32)."""
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(_SEED)
    config = SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        num_labels=5,
        attn_implementation="eager",
    )
    model = SwinForImageClassification(config).eval()
    return model, (torch.randn(_BATCH, 3, 32, 32, generator=_gen()),)


def mobilebert_encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """MobileBERT (bottleneck in/out projections around narrow attention, stacked FFNs, NoNorm).
    Inputs input_ids and attention_mask (2, 16) -> a ModelOutput with last_hidden_state."""
    from transformers import MobileBertConfig, MobileBertModel

    torch.manual_seed(_SEED)
    config = MobileBertConfig(
        vocab_size=1000,
        hidden_size=64,
        embedding_size=32,
        intra_bottleneck_size=32,
        true_hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_feedforward_networks=2,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = MobileBertModel(config, add_pooling_layer=False).eval()
    mask = torch.ones(_BATCH, 16, dtype=torch.int64)
    mask[1, 12:] = 0
    return model, (_ids(1000), mask)


def mobilevit_classifier() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """MobileViT: MobileNetV2 inverted residuals with transformer blocks over unfolded patches."""
    from transformers import MobileViTConfig, MobileViTForImageClassification

    torch.manual_seed(_SEED)
    config = MobileViTConfig(
        image_size=32,
        patch_size=2,
        hidden_sizes=[32, 48, 64],
        neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 96],
        num_attention_heads=2,
        num_labels=5,
        expand_ratio=2.0,
    )
    model = _finish(MobileViTForImageClassification(config))
    return model, (torch.randn(_BATCH, 3, 32, 32, generator=_gen()),)


def moe_decoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Mixtral-style decoder: sparse mixture of experts (4 experts, top-2 routing), GQA, RoPE."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(_SEED)
    config = MixtralConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return MixtralForCausalLM(config).eval(), (_ids(1000),)


def phi3_decoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Phi-3-style decoder: fused qkv_proj and gate_up_proj Linears."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(_SEED)
    config = Phi3Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    return Phi3ForCausalLM(config).eval(), (_ids(1000),)


class SpeechLSTM(nn.Module):
    """Keyword-spotting style: per-frame Linear over filterbank features, a 2-layer bidirectional LSTM,
    mean over time, Linear classifier. Most of the weight bytes are in the LSTM."""

    def __init__(self, features: int = 20, hidden: int = 48, num_classes: int = 6) -> None:
        super().__init__()
        self.frontend = nn.Sequential(nn.Linear(features, 32), nn.ReLU())
        self.lstm = nn.LSTM(32, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.classifier = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.frontend(x))  # (B, T, 2 * hidden)
        return self.classifier(out.mean(1))


def speech_lstm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """2-layer bidirectional LSTM over (2, 12, 20) features -> (2, 6) logits."""
    torch.manual_seed(_SEED)
    return SpeechLSTM().eval(), (torch.randn(_BATCH, 12, 20, generator=_gen()),)


class StackedGRU(nn.Module):
    """2-layer GRU (not batch-first) over features; the last step's state -> Linear."""

    def __init__(self, features: int = 16, hidden: int = 48, num_classes: int = 5) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, num_layers=2)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.transpose(0, 1))  # (T, B, hidden)
        return self.fc(out[-1])


def stacked_gru() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """2-layer GRU over (2, 12, 16) batch-first features -> (2, 5) logits."""
    torch.manual_seed(_SEED)
    return StackedGRU().eval(), (torch.randn(_BATCH, 12, 16, generator=_gen()),)


def convnext_classifier() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """ConvNeXt: depthwise 7x7 convs, channels-last LayerNorm, Linear pointwise MLPs, layer scale."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(_SEED)
    config = ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5, image_size=32)
    return ConvNextForImageClassification(config).eval(), (torch.randn(_BATCH, 3, 32, 32, generator=_gen()),)


def segformer_segmenter() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """SegFormer: overlapping patch embeddings, efficient (spatially reduced) attention, an all-MLP decoder."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(_SEED)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=32,
        num_labels=3,
    )
    model = _finish(SegformerForSemanticSegmentation(config))
    return model, (torch.randn(_BATCH, 3, 32, 32, generator=_gen()),)


def wav2vec2_encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """wav2vec2: a strided Conv1d feature encoder over raw audio, positional conv, transformer encoder."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(_SEED)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return Wav2Vec2Model(config).eval(), (torch.randn(_BATCH, 400, generator=_gen()),)


#: Architectures as users bring them, for the generality test: every technique on each is either `ok`
#: (compressed, exported, parity in every runtime) or a clear modelpress refusal.
WIDE_ZOO: dict[str, Factory] = {
    **ZOO,
    "gpt2_lm": gpt2_lm,
    "whisper_encoder": whisper_encoder,
    "swin_classifier": swin_classifier,
    "mobilebert_encoder": mobilebert_encoder,
    "mobilevit_classifier": mobilevit_classifier,
    "moe_decoder": moe_decoder,
    "phi3_decoder": phi3_decoder,
    "speech_lstm": speech_lstm,
    "stacked_gru": stacked_gru,
    "convnext_classifier": convnext_classifier,
    "segformer_segmenter": segformer_segmenter,
    "wav2vec2_encoder": wav2vec2_encoder,
}
