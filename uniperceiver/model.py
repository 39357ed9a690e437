"""UniPerceiver: the generalist model. Every task ranks candidate targets by the cosine similarity of
their representations: an input sequence and each candidate are encoded separately by the same decoder,
and the output at a <SPE> token represents a sequence.

Sequences (see DESIGN.md and notes/uniperceiver-family.md):
- image:      [SPE, global tokens, patch tokens]                    -> SPE output
- text:       [SPE, text-encoder states]                            -> SPE output
- VQA input:  [SPE, image tokens, question states, SPE query]       -> query output, vs answers as texts
- caption:    [SPE, image tokens, words, one SPE query per word]    -> query j output, vs the vocabulary
- open VQA:   [SPE, image tokens, question states, words, queries] -> as caption, conditioned on the question
- detection:  [SPE, image tokens, region tokens]                    -> each region's output, vs category names
- text-to-image: [SPE, text-encoder states] -> every output state, read by the diffusion branch's cross-attention
Caption words enter the decoder as single-token features (each vocabulary token encoded alone by the text
encoder), the same features that represent the vocabulary as candidates: a contextual encoding of the whole
caption would let word j leak into the states of the words before it.
With MoE layers in the decoder (`DecoderConfig.moe_experts > 0`) every sequence also carries its tokens'
routing attributes; the role each path gives its sequence is tabled in `attributes.py`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .caching import WeightsCache
from .attributes import (IMAGE_INPUT, IMAGE_TEXT_INPUT, REGION_INPUT, TEXT_CANDIDATE, WORD_CANDIDATE,
                         SequenceRole, caption_causal_span, decoder_attributes)
from .decoder import DecoderConfig, Modality, SharedDecoder
from .diffusion import DiffusionBranch, DiffusionConfig, zero3_partitioned
from .generation import packed_positions
from .grounding import PhraseGrounding, QuestionGrounding
from .image_encoder import ImageEncoder, ImageEncoderConfig
from .masks import padded_caption_attention_mask
from .processing import PROCESSOR_FILE, ImageProcessor
from .readout import DEFAULT_FAMILIES, SimilarityReadout
from .region_proposals import ContextRegions, Proposals, RegionConfig, RegionProposalNetwork, RegionTokens
from .text_encoder import DTYPES, TextEncoder, TextEncoderConfig, end_of_text_id

ARCHITECTURE = "UniPerceiver"
CONFIG_FILE, WEIGHTS_FILE, TEXT_FOLDER = "config.json", "model.safetensors", "text_model"
DIFFUSION_FOLDER = "diffusion"  # diffusers' own files of the text-to-image branch: unet/, scheduler/ (vae/)
DEFAULT_TEMPLATES = ("a photo of a {}.",)
CATEGORY_CHUNK = 256  # category names encoded per forward pass (an LVIS list of 1,203 takes five)


@dataclass
class UniPerceiverConfig:
    """The whole model as data: what `save_pretrained` writes to config.json."""
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    embed_dim: int = 256
    families: tuple[str, ...] = DEFAULT_FAMILIES
    caption_vocab: list[int] | None = None  # candidate token ids for captioning; None = every non-special token
    max_caption_length: int = 20
    detection: RegionConfig | None = None  # the region-proposal head; None: a model without detection
    diffusion: DiffusionConfig | None = None  # the text-to-image branch; None: a model without it

    def __post_init__(self):
        for name, kind in (("image", ImageEncoderConfig), ("text", TextEncoderConfig), ("decoder", DecoderConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(kind, value, f"config.{name}"))
        if isinstance(self.detection, dict):
            self.detection = _from_dict(RegionConfig, self.detection, "config.detection")
        if isinstance(self.diffusion, dict):
            self.diffusion = _from_dict(DiffusionConfig, self.diffusion, "config.diffusion")
        self.families = tuple(self.families)
        self.text.width = self.decoder.width  # text states enter the decoder directly

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": ARCHITECTURE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "UniPerceiverConfig":
        data = dict(data)
        architecture = data.pop("architecture", ARCHITECTURE)
        if architecture != ARCHITECTURE:
            raise ValueError(f"{source}: architecture is {architecture!r}, expected {ARCHITECTURE!r}")
        return _from_dict(cls, data, source)


def tiny_config(**overrides) -> UniPerceiverConfig:
    """A model that trains on a laptop CPU in seconds: a toy InternImage, the built-in tiny Llama text model,
    a 2-layer decoder of width 64. The configuration of the tests; the built-in recipe (launch/recipes/tiny.yaml)
    starts from it with a wider backbone, 4 decoder layers and finer patch tokens."""
    base = dict(
        image=dict(backbone="internimage_t", num_global_tokens=2, image_size=64,
                   backbone_overrides=dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)),
        text=dict(name_or_path="builtin-tiny", mode="full"),
        # No layer scale: at 1e-3 a 2-layer decoder starts with every <SPE> output nearly identical (cosine
        # 0.9999998 between inputs) and a tiny model fails to separate a handful of examples.
        decoder=dict(width=64, depth=2, heads=4, layer_scale_init=None),
        embed_dim=64)
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return UniPerceiverConfig.from_dict(base)


def _save_weights(model: nn.Module, path: Path, left_out: set[str]) -> None:
    """safetensors' save_model (which drops the duplicate names of tied weights), without the keys `left_out`."""
    from safetensors.torch import save_file, save_model
    if not left_out:
        save_model(model, str(path))
        return
    from safetensors.torch import _remove_duplicate_names  # what save_model does about tied weights
    state = {key: value for key, value in model.state_dict().items() if key not in left_out}
    metadata = {"format": "pt"}
    for kept, names in _remove_duplicate_names(state).items():
        for name in names:
            metadata[name] = kept
            del state[name]
    save_file({key: value.contiguous() for key, value in state.items()}, str(path), metadata=metadata)


def _is_model_batch(images: Any, size: int) -> bool:
    """A (B, 3, size, size) float tensor: pixels already preprocessed for the model (what tasks and suites pass)."""
    return (isinstance(images, Tensor) and images.is_floating_point() and images.dim() == 4
            and tuple(images.shape[1:]) == (3, size, size))


def _text_list(texts: Any, argument: str, batch: int | None = None) -> list[str]:
    """A string or a sequence of strings -> a list; one bare string stands for every picture of a batch. Errors name
    `argument`."""
    if isinstance(texts, str):
        return [texts] * (batch or 1)
    if isinstance(texts, Tensor) or not isinstance(texts, Sequence):
        raise TypeError(f"{argument}: expected a string or a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise TypeError(f"{argument}[{bad[0]}]: expected a string, got {type(texts[bad[0]]).__name__}")
    if not texts:
        raise ValueError(f"{argument}: an empty list")
    if batch is not None and len(texts) != batch:
        raise ValueError(f"{argument}: {len(texts)} texts for {batch} images")
    return texts


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected a torch dtype or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _from_dict(kind, data: dict[str, Any], source: str):
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; {kind.__name__} has {sorted(known)}")
    return kind(**data)


class UniPerceiver(nn.Module):
    """Image encoder + text encoder -> shared decoder -> similarity readout."""

    def __init__(self, config: UniPerceiverConfig | dict | None = None, load_text_weights: bool = True,
                 load_image_checkpoint: bool = True, diffusion_root: str | Path | None = None):
        super().__init__()
        if isinstance(config, dict):
            config = UniPerceiverConfig.from_dict(config)
        self.config = config = config or UniPerceiverConfig()
        width = config.decoder.width
        image_config = config.image if load_image_checkpoint else ImageEncoderConfig(
            **{**config.image.to_dict(), "checkpoint": None})
        self.image_encoder = ImageEncoder(image_config, width)
        self.text_encoder = TextEncoder(config.text, load_weights=load_text_weights)
        self.decoder = SharedDecoder(config.decoder)
        self.readout = SimilarityReadout(width, config.embed_dim, config.families)
        self.register_buffer("caption_vocab", torch.tensor(self._caption_vocab(), dtype=torch.long), persistent=False)
        self.region_proposer = self.region_tokens = self.context_tokens = self.context_score = None
        self.context_name = self.grounding = None
        if config.detection is not None:
            self._build_detection(config.detection, width)
        # diffusion_root: a saved model's diffusion/ folder, which replaces config.diffusion.pretrained
        self.diffusion = DiffusionBranch(config.diffusion, width, diffusion_root) if config.diffusion else None
        # the release's evaluation preprocessing at the model's size (what every task trains on); from_pretrained
        # reads the saved one
        self.image_processor = ImageProcessor(size=config.image.image_size)
        self.cache = WeightsCache()  # vocabulary, class, answer and category embeddings of the current weights

    def _build_detection(self, config: RegionConfig, width: int) -> None:
        info = self.image_encoder.backbone.feature_info
        bad = [level for level in config.levels if not 0 <= level < len(info)]
        if bad:
            raise ValueError(f"config.detection.levels {list(config.levels)}: the backbone has stages "
                             f"0..{len(info) - 1}")
        channels = [info[level]["num_chs"] for level in config.levels]
        strides = [info[level]["reduction"] for level in config.levels]
        self.region_proposer = RegionProposalNetwork(config, channels, strides)
        self.region_tokens = RegionTokens(config, channels, strides, width)
        if config.context_regions:
            # Context regions get RoI projections of their own: shared with every task, detection's were pulled
            # away from naming (box AP 0.56 -> 0.29-0.47 over three runs). Their tokens also say how sure the
            # proposer is (padding and background proposals score about 0).
            self.context_tokens = RegionTokens(config, channels, strides, width)
            self.context_score = nn.Linear(1, width)
            if config.context_names:
                self.context_name = nn.Linear(self.config.embed_dim, width)
            if config.ground_text:
                self.grounding = PhraseGrounding(width, config.box_frequencies, content=config.ground_content,
                                                 relations=config.ground_relations,
                                                 relation_words=config.ground_relation_words,
                                                 counts=config.ground_counts, max_count=config.context_regions)

    @property
    def has_detection(self) -> bool:
        return self.region_proposer is not None

    @property
    def has_diffusion(self) -> bool:
        return self.diffusion is not None

    def train(self, mode: bool = True):
        self.cache.clear()  # the embeddings change as soon as training does
        return super().train(mode)

    def cached(self, key, compute):
        """`compute()`, or its value from an earlier call with the same weights (outside autograd only)."""
        return self.cache.get(self, key, compute)

    # ------------------------------------------------------------------------------------------ inputs
    @property
    def device(self) -> torch.device:
        return next(self.image_encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.image_encoder.parameters()).dtype

    def prepare_images(self, images, argument: str = "images", resize: str | None = None) -> Tensor:
        """PIL images, paths, numpy arrays, uint8 tensors (raw pixels) or float tensors (preprocessed pixels), one or
        a batch -> (B, 3, S, S) normalised pixels on the model's device and in its dtype (see `processing.py`)."""
        pixels = images if _is_model_batch(images, self.image_processor.size) else self.image_processor(
            images, argument, resize)
        return pixels.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------------------------------ tokens
    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    @property
    def end_token_id(self) -> int:
        """The token id that ends a caption: the tokenizer's end-of-sequence (or [SEP] for BERT-style ones)."""
        end = end_of_text_id(self.tokenizer)
        if end is None:
            raise ValueError(f"text model {self.config.text.name_or_path!r}: its tokenizer has neither an "
                             "end-of-sequence nor a [SEP] token, so captions cannot end")
        return end

    def _caption_vocab(self) -> list[int]:
        tokenizer = self.tokenizer
        if self.config.caption_vocab is not None:
            vocab = sorted(set(self.config.caption_vocab) | {self.end_token_id})
        else:
            special = set(tokenizer.all_special_ids) - {self.end_token_id}
            vocab = [i for i in range(len(tokenizer)) if i not in special]
        bad = [i for i in vocab if not 0 <= i < len(tokenizer)]
        if bad:
            raise ValueError(f"config.caption_vocab: token ids {bad[:5]} are outside the tokenizer's {len(tokenizer)}")
        return vocab

    def caption_token_ids(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions -> indices into `caption_vocab` (B, L) ending with end-of-sequence, and lengths (B,).
        Tokens outside the caption vocabulary raise, naming the caption."""
        eos = self.end_token_id
        position = {int(t): i for i, t in enumerate(self.caption_vocab.tolist())}
        rows = []
        for caption in captions:
            ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"][: self.config.max_caption_length - 1]
            ids.append(eos)
            missing = [t for t in ids if t not in position]
            if missing:
                raise ValueError(f"caption {caption!r}: tokens {self.tokenizer.convert_ids_to_tokens(missing)} are not "
                                 "in config.caption_vocab")
            rows.append([position[t] for t in ids])
        lengths = torch.tensor([len(r) for r in rows])
        padded = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = torch.tensor(row)
        return padded.to(self.caption_vocab.device), lengths.to(self.caption_vocab.device)

    def vocabulary_features(self, token_ids: Tensor | None = None) -> Tensor:
        """Each token encoded alone by the text encoder: (V, width) for `token_ids` (default the caption vocab,
        cached outside autograd)."""
        if token_ids is None:
            return self.cached("vocabulary_features", lambda: self.vocabulary_features(self.caption_vocab))
        batch = {"input_ids": token_ids[:, None], "attention_mask": torch.ones_like(token_ids)[:, None]}
        features, _ = self.text_encoder(batch)
        return features[:, 0]

    # ---------------------------------------------------------------------------------------- encoders
    def encoder_modules(self) -> tuple[nn.Module, nn.Module]:
        """The image backbone and the language model: the parts an official checkpoint usually supplies, which
        recipes train at a lower learning rate (`optimizer.encoder_lr_scale`)."""
        return self.image_encoder.backbone, self.text_encoder.model

    def image_tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The image's decoder tokens (global, patch and, with `detection.context_regions`, region tokens)
        and their modality ids: what every task's input sequence starts with."""
        tokens, kinds, _ = self.image_tokens_and_regions(images)
        return tokens, kinds

    def image_tokens_and_regions(self, images: Tensor) -> tuple[Tensor, Tensor, ContextRegions | None]:
        """`image_tokens`, and the context regions among them (None without `detection.context_regions`)."""
        if self.context_score is None:
            tokens, kinds = self.image_encoder(images)
            return tokens, kinds, None
        tokens, kinds, maps = self.image_encoder.encode(images)
        regions = self.context_regions(tokens, kinds, [maps[level] for level in self.config.detection.levels],
                                       tuple(images.shape[-2:]))
        region_kinds = torch.full(regions.tokens.shape[:2], int(Modality.REGION), device=kinds.device,
                                  dtype=kinds.dtype)
        return torch.cat([tokens, regions.tokens], 1), torch.cat([kinds, region_kinds], 1), regions

    def context_regions(self, tokens: Tensor, kinds: Tensor, maps: list[Tensor],
                        image_size: tuple[int, int]) -> ContextRegions:
        """The region tokens of the image's best `context_regions` proposals (boxes found without gradients;
        the RoI features train with every task), in proposal order, which follow its image tokens. With
        `context_names`, each also carries detection's embedding of its box, found without gradients: the other
        tasks read what detection learns to name and cannot pull detection away from naming."""
        with torch.no_grad():
            proposals = self.propose_regions(maps, image_size, self.config.detection.context_regions)
            names = None if self.context_name is None else self.region_embeddings(
                tokens, kinds, maps, proposals.boxes, proposals.valid, image_size)
        scores = (proposals.scores * proposals.valid).to(tokens.dtype)[..., None]
        regions = self.context_tokens(maps, proposals.boxes, image_size).to(tokens.dtype) + self.context_score(scores)
        if names is not None:
            regions = regions + self.context_name(names.to(tokens.dtype) * scores.gt(0))
        return ContextRegions(regions, proposals.boxes, proposals.valid, image_size)

    def text_tokens(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        features, valid = self.text_encoder(list(texts))
        return features, valid

    def _spe_output(self, tokens: Tensor, kinds: Tensor, role: SequenceRole, valid: Tensor | None = None) -> Tensor:
        tokens, kinds = self.decoder.prepend_spe(tokens, kinds)
        if valid is not None:
            valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        attributes = decoder_attributes(self.decoder, kinds, role)
        return self.decoder(tokens, kinds, valid=valid, attributes=attributes).hidden_states[:, 0]

    def forward(self, task, batch: dict) -> Tensor:
        """`task.loss(self, batch)`: the training loss as one call of the module, so that wrappers acting around
        a module's forward (DeepSpeed's engine counting ZeRO micro-steps, DDP) see every step.

        Every family's temperature joins the loss with weight 0, so those the task does not use get a zero
        gradient rather than none: under DeepSpeed ZeRO-3 a parameter that got no gradient in a step was
        updated from an earlier step's (the idle VQA temperature moved against the plain loop's)."""
        loss = task.loss(self, batch)
        loss = loss + 0.0 * torch.stack([self.readout.scale(family) for family in self.readout.families]).sum()
        family = getattr(task, "family", "")
        if self.has_detection and family != "detection":
            loss = loss + 0.0 * self._idle_detection_term(loss)
        if family == "detection" and self.context_tokens is not None and zero3_partitioned(
                self.context_tokens.parameters()):  # detection reads no context regions
            loss = loss + 0.0 * self._idle_context_term(loss)
        asks_questions = family == "vqa" and getattr(task, "mode", "rank") == "rank"  # generate answers by captioning
        if self.grounding is not None and not asks_questions and zero3_partitioned(self.grounding.parameters()):
            loss = loss + 0.0 * self._idle_grounding_term(loss)
        # The branch and the image encoder idle on each other's steps; only ZeRO-3 needs them run (the engine's
        # touch_every_parameter gives idle parameters their zero gradient otherwise, for 10% less time a step).
        if self.has_diffusion and family != "diffusion" and zero3_partitioned(self.diffusion.projection.parameters()):
            loss = loss + 0.0 * self._idle_diffusion_term(loss)
        if family == "diffusion" and zero3_partitioned(self.image_encoder.parameters()):
            size = self.config.image.image_size
            loss = loss + 0.0 * self.image_tokens(loss.new_zeros(1, 3, size, size))[0].sum()
        return loss

    def _idle_diffusion_term(self, like: Tensor) -> Tensor:
        """The diffusion branch run on one 4-pixel-wide noise sample (the same ZeRO-3 reason as below)."""
        branch = self.diffusion
        side = 2 ** (len(branch.unet.config.block_out_channels) - 1)
        condition = branch.condition(like.new_zeros(1, 1, self.config.decoder.width),
                                     torch.ones(1, 1, dtype=torch.bool, device=like.device),
                                     torch.ones(1, dtype=torch.bool, device=like.device))
        sample = like.new_zeros(1, branch.unet.config.in_channels, side, side)
        return branch.predict(sample, like.new_zeros(1, dtype=torch.long), condition).sum()

    def _zero_maps(self, like: Tensor) -> tuple[list[Tensor], Tensor]:
        """One-pixel zero maps at the detection levels' widths and one box on them: what the idle terms run."""
        channels = [lateral.in_channels for lateral in self.region_proposer.lateral]
        return [like.new_zeros(1, c, 1, 1) for c in channels], like.new_tensor([[[0.0, 0.0, 1.0, 1.0]]])

    def _idle_detection_term(self, like: Tensor) -> Tensor:
        """The detection head run on one-pixel zero maps: a step of another task gives its parameters a zero
        gradient rather than none, for the same ZeRO-3 reason as the temperatures above."""
        maps, box = self._zero_maps(like)
        dense = self.region_proposer(maps)
        tokens = self.region_tokens(maps, box, (1, 1))
        return dense.objectness.sum() + dense.centreness.sum() + dense.distances.sum() + tokens.sum()

    def _idle_context_term(self, like: Tensor) -> Tensor:
        """The context regions' modules on the same zero maps, for detection's steps (which read no context
        regions), for the same reason."""
        maps, box = self._zero_maps(like)
        term = self.context_tokens(maps, box, (1, 1)).sum() + self.context_score(like.new_zeros(1, 1)).sum()
        if self.context_name is not None:
            term = term + self.context_name(like.new_zeros(1, self.config.embed_dim)).sum()
        return term

    def _idle_grounding_term(self, like: Tensor) -> Tensor:
        """The grounding layer on one zero token and region, for the steps that do not rank answers to questions."""
        width = self.config.decoder.width
        zero = like.new_zeros(1, 1, width)
        grounded, logits, pairs, counts = self.grounding(zero, zero, like.new_tensor([[[0.0, 0.0, 1.0, 1.0]]]),
                                                         torch.ones(1, 1, dtype=torch.bool, device=like.device),
                                                         (1, 1))
        return (grounded.sum() + logits.sum() + (0.0 if pairs is None else pairs[..., -1].sum())  # the one unmasked
                + (0.0 if counts is None else counts.sum()))

    def encode_image(self, images) -> Tensor:
        """Pictures (PIL, paths, numpy, tensors; see `prepare_images`) -> (B, embed_dim) embeddings (unit norm)."""
        tokens, kinds = self.image_tokens(self.prepare_images(images))
        return self.readout(self._spe_output(tokens, kinds, IMAGE_INPUT))

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Texts -> (B, embed_dim) embeddings (unit norm), encoded as candidate texts of an image task
        (class names, answers, captions; see `attributes.py` for why every caller shares that role). One string is
        a batch of one."""
        tokens, valid = self.text_tokens(_text_list(texts, "texts"))
        kinds = torch.full(valid.shape, int(Modality.TEXT), device=valid.device)
        return self.readout(self._spe_output(tokens, kinds, TEXT_CANDIDATE, valid))

    def encode_words(self, token_ids: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Vocabulary candidates [SPE, token] -> (V, embed_dim): what caption queries are ranked against. `features`:
        the tokens' `vocabulary_features`, when the caller has them already. The caption vocabulary's candidates
        (no `token_ids`) are cached outside autograd."""
        if token_ids is None and features is None:
            return self.cached("word_candidates", lambda: self.encode_words(features=self.vocabulary_features()))
        features = (self.vocabulary_features(token_ids) if features is None else features)[:, None]
        kinds = torch.full(features.shape[:2], int(Modality.TEXT), device=features.device)
        return self.readout(self._spe_output(features, kinds, WORD_CANDIDATE))

    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> Tensor:
        """One vector per class: the normalised mean of its normalised template embeddings (cached per list
        outside autograd)."""
        class_names, templates = _text_list(class_names, "class_names"), _text_list(templates, "templates")

        return self.cached(("classes", tuple(class_names), tuple(templates)),
                           lambda: self._embed_classes(class_names, templates))

    def _embed_classes(self, class_names: list[str], templates: list[str]) -> Tensor:
        texts = [template.format(name) for name in class_names for template in templates]
        embeddings = self.encode_text(texts).view(len(class_names), len(templates), -1)
        return F.normalize(embeddings.mean(dim=1), dim=-1)

    def vqa_query(self, images, questions: Sequence[str], image_index: Tensor | Sequence[int] | None = None
                  ) -> Tensor:
        """[SPE, image, question, SPE query] -> the query's embedding (Q, embed_dim). Without `image_index` the
        i-th question asks about the i-th picture; with it, question i asks about picture `image_index[i]`, and
        each picture's tokens are computed once however many questions it has (training on every question of a
        picture costs one backbone pass). With `detection.ground_text` the question's tokens first read the
        context regions' places (`uniperceiver.grounding`)."""
        return self.vqa_query_and_grounding(images, questions, image_index)[0]

    def vqa_query_and_grounding(self, images, questions: Sequence[str],
                                image_index: Tensor | Sequence[int] | None = None
                                ) -> tuple[Tensor, QuestionGrounding | None]:
        """`vqa_query`, and with `detection.ground_text` each question token's grounding logits over its
        picture's K context regions and, last, the "no object" slot (Q, L, K + 1), with those regions' boxes
        (Q, K, 4), which a task can supervise (the VQA task's `grounding_weight`); None without it."""
        image_tokens, image_kinds, regions = self.image_tokens_and_regions(self.prepare_images(images))
        if image_index is not None:
            image_index = torch.as_tensor(image_index, dtype=torch.long, device=image_tokens.device)
            if image_index.dim() != 1 or (image_index.numel() and not 0 <= int(image_index.min()) <= int(
                    image_index.max()) < image_tokens.shape[0]):
                raise ValueError(f"vqa_query: image_index must be a 1-D list of picture indices in [0, "
                                 f"{image_tokens.shape[0]}), got {image_index.tolist()}")
            image_tokens, image_kinds = image_tokens[image_index], image_kinds[image_index]
            if regions is not None:
                regions = ContextRegions(regions.tokens[image_index], regions.boxes[image_index],
                                         regions.valid[image_index], regions.image_size)
        batch = image_tokens.shape[0]
        questions = _text_list(questions, "questions", batch)
        tokenized = self.text_encoder.tokenize(questions, offsets=self.grounding is not None)
        text, text_valid = self.text_encoder(tokenized)
        grounding = None
        if self.grounding is not None:
            text, logits, pairs, counts = self.grounding(text, regions.tokens, regions.boxes, regions.valid,
                                                         regions.image_size, text_valid)
            grounding = QuestionGrounding(logits, regions.boxes, regions.valid, tokenized["offset_mapping"], pairs,
                                          counts)
        tokens = torch.cat([image_tokens, text], dim=1)
        kinds = torch.cat([image_kinds, torch.full(text_valid.shape, int(Modality.TEXT), device=text.device)], 1)
        tokens, kinds = self.decoder.prepend_spe(tokens, kinds)
        tokens, kinds = self.decoder.append_spe_queries(tokens, kinds, 1)
        ones = torch.ones(batch, 1 + image_tokens.shape[1], dtype=torch.bool, device=text.device)
        valid = torch.cat([ones, text_valid, ones[:, :1]], dim=1)
        # Positions count real tokens only: a sample's answer does not depend on its batch's padding.
        attributes = decoder_attributes(self.decoder, kinds, IMAGE_TEXT_INPUT)
        hidden = self.decoder(tokens, kinds, packed_positions(valid), valid=valid, attributes=attributes).hidden_states
        return self.readout(hidden[:, -1]), grounding

    # -------------------------------------------------------------------------------------- detection
    def _require_detection(self) -> None:
        if not self.has_detection:
            raise ValueError("this model has no detection head: build it with config.detection "
                             "(e.g. UniPerceiverConfig(detection={}) or the recipe's model.detection)")

    def image_features(self, images: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Image tokens, their modality ids and the backbone maps the detection head reads (its levels)."""
        self._require_detection()
        tokens, kinds, maps = self.image_encoder.encode(images)
        return tokens, kinds, [maps[level] for level in self.config.detection.levels]

    def propose_regions(self, maps: list[Tensor], image_size: tuple[int, int],
                        num_proposals: int | None = None) -> Proposals:
        return self.region_proposer.propose(self.region_proposer(maps), image_size, num_proposals)

    def region_embeddings(self, image_tokens: Tensor, image_kinds: Tensor, maps: list[Tensor], boxes: Tensor,
                          valid: Tensor, image_size: tuple[int, int]) -> Tensor:
        """[SPE, image tokens, region tokens] through the decoder -> (B, K, embed_dim) one embedding per box.
        boxes (B, K, 4) xyxy in input pixels; valid (B, K), False for padding. The regions share one position,
        so that their order means nothing."""
        regions = self.region_tokens(maps, boxes, image_size).to(image_tokens.dtype)
        batch, count = boxes.shape[:2]
        region_kinds = torch.full((batch, count), int(Modality.REGION), device=image_kinds.device)
        tokens, kinds = self.decoder.prepend_spe(torch.cat([image_tokens, regions], 1),
                                                 torch.cat([image_kinds, region_kinds], 1))
        prefix = 1 + image_tokens.shape[1]
        positions = torch.cat([torch.arange(prefix, device=tokens.device),
                               torch.full((count,), prefix, device=tokens.device)]).expand(batch, -1)
        valid = torch.cat([torch.ones(batch, prefix, dtype=torch.bool, device=tokens.device),
                           valid.to(tokens.device)], dim=1)
        attributes = decoder_attributes(self.decoder, kinds, REGION_INPUT)
        hidden = self.decoder(tokens, kinds, positions, valid=valid, attributes=attributes).hidden_states
        return self.readout(hidden[:, prefix:])

    def category_embeddings(self, categories: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
                            ) -> Tensor:
        """(C, embed_dim) one embedding per category name, CATEGORY_CHUNK names per forward pass; cached per
        (names, templates) outside training, so a list is encoded once however many pictures use it."""
        names, templates = _text_list(categories, "categories"), _text_list(templates, "templates")
        return self.cached(("categories", tuple(names), tuple(templates)), lambda: torch.cat(
            [self._embed_classes(names[i:i + CATEGORY_CHUNK], templates) for i in range(0, len(names), CATEGORY_CHUNK)]))

    def region_logits(self, region_embeddings: Tensor, category_embeddings: Tensor) -> Tensor:
        """(..., K, C) scaled cosine similarities of regions and category names (the `detection` family)."""
        return self.readout.similarity(region_embeddings, category_embeddings, "detection")

    @torch.no_grad()
    def detect(self, images, categories: Sequence[str], score_threshold: float = 0.3, max_detections: int = 100,
               templates: Sequence[str] = DEFAULT_TEMPLATES) -> list:
        """Open-vocabulary detection: pictures of any size (PIL, paths, numpy arrays, uint8 tensors, or a
        (B, 3, H, W) normalised float tensor), and any list of category names -> per picture a `Detections` (boxes
        xyxy in that picture's pixels, scores, labels indexing `categories`). Pictures are resized to the model's
        square input without a crop, as detection trains."""
        from .detection import resize_for_detection, select_detections
        from .processing import as_picture_list, to_pil

        self._require_detection()
        size = self.config.image.image_size
        if not (isinstance(images, Tensor) and images.is_floating_point()):
            items = as_picture_list(images)
            images = [to_pil(item, f"images[{i}]" if len(items) > 1 else "images") for i, item in enumerate(items)]
        pixels, picture_sizes = resize_for_detection(images, size)
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        names = self.category_embeddings(categories, templates)
        tokens, kinds, maps = self.image_features(pixels)
        proposals = self.propose_regions(maps, (size, size))
        regions = self.region_embeddings(tokens, kinds, maps, proposals.boxes, proposals.valid, (size, size))
        probabilities = self.region_logits(regions, names).float().softmax(dim=-1)
        return [select_detections(proposals.boxes[i], proposals.scores[i], proposals.valid[i], probabilities[i],
                                  (size, size), picture_sizes[i], score_threshold, max_detections)
                for i in range(pixels.shape[0])]

    # ---------------------------------------------------------------------------------- text to image
    def _require_diffusion(self) -> None:
        if not self.has_diffusion:
            raise ValueError("this model has no diffusion branch: build it with config.diffusion "
                             "(e.g. UniPerceiverConfig(diffusion={}) or the recipe's model.diffusion)")

    def prompt_states(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """[SPE, text-encoder states] through the decoder, encoded as a candidate text (as `encode_text`) ->
        every output state (B, 1 + L, width) and valid (B, 1 + L): what the diffusion branch attends to."""
        tokens, valid = self.text_tokens(prompts)
        kinds = torch.full(valid.shape, int(Modality.TEXT), device=valid.device)
        tokens, kinds = self.decoder.prepend_spe(tokens, kinds)
        valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        attributes = decoder_attributes(self.decoder, kinds, TEXT_CANDIDATE)
        return self.decoder(tokens, kinds, valid=valid, attributes=attributes).hidden_states, valid

    @torch.no_grad()
    def generate_images(self, prompts: Sequence[str] | str, steps: int = 20, guidance: float | None = None,
                        seed: int | Sequence[int] = 0, negative_prompt: str | Sequence[str] | None = None,
                        progress: bool = False, callback=None, bf16: bool = False) -> list:
        """Text to image: one PIL picture per prompt, by DPM-Solver++ in `steps` steps with classifier-free
        guidance (`guidance`, default the config's; against the learned null condition, or the decoder's states
        of `negative_prompt`). `seed` is one seed for every picture or one per prompt: a picture depends on its
        prompt and seed only. `callback(done, total)` is called after each sampling step. `bf16`: run the UNet
        under bfloat16 autocast, 1.3-1.6x as fast on a CPU with AVX-512 BF16 (measured; GPUs untested); the
        pictures then differ from float32's by a few levels of 255."""
        from .diffusion import to_pil

        self._require_diffusion()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("generate_images: no prompts")
        seeds = [seed] * len(prompts) if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != len(prompts):
            raise ValueError(f"generate_images: {len(seeds)} seeds for {len(prompts)} prompts")
        branch = self.diffusion
        was_training = self.training
        self.eval()
        try:
            states, valid = self.prompt_states(prompts)
            condition = branch.condition(states, valid)
            if negative_prompt is None:
                unconditional = branch.null(len(prompts), states.device)
            else:
                negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(
                    negative_prompt)
                if len(negatives) != len(prompts):
                    raise ValueError(f"generate_images: {len(negatives)} negative prompts for {len(prompts)} prompts")
                unconditional = branch.condition(*self.prompt_states(negatives))
            pictures = branch.sample(condition, unconditional, seeds, steps,
                                     branch.config.guidance if guidance is None else guidance, progress, callback,
                                     bf16=bf16)
        finally:
            self.train(was_training)
        return to_pil(pictures)

    # ------------------------------------------------------------------------------------- captioning
    def caption_prefix(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.image_tokens(images)

    def generation_prefix(self, images: Tensor, prompts: Sequence[str] | None = None
                          ) -> tuple[Tensor, Tensor, Tensor]:
        """What generated words are conditioned on (the <SPE> excluded): image tokens, followed by the
        text-encoder states of `prompts` (e.g. VQA questions) when given. Returns tokens (B, P, width),
        modality ids (B, P) and valid (B, P), False for prompt padding."""
        tokens, kinds = self.caption_prefix(images)
        valid = torch.ones(kinds.shape, dtype=torch.bool, device=kinds.device)
        if prompts is None:
            return tokens, kinds, valid
        if len(prompts) != tokens.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {tokens.shape[0]} images")
        text, text_valid = self.text_tokens(prompts)
        text_kinds = torch.full(text_valid.shape, int(Modality.TEXT), device=kinds.device)
        return (torch.cat([tokens, text.to(tokens.dtype)], 1), torch.cat([kinds, text_kinds], 1),
                torch.cat([valid, text_valid.to(valid.device)], 1))

    def caption_logits(self, images: Tensor, word_indices: Tensor, lengths: Tensor,
                       word_embeddings: Tensor | None = None, prompts: Sequence[str] | None = None) -> Tensor:
        """Teacher-forced captioning: (B, L, V) logits of every word position over the caption vocabulary,
        all positions in one parallel pass under the caption mask. With `prompts` (VQA questions) the words
        are also conditioned on them: the generation loss of open-ended answers."""
        prefix, prefix_kinds, prefix_valid = self.generation_prefix(images, prompts)
        vocab_features = self.vocabulary_features()
        words = vocab_features[word_indices]
        inputs = self.decoder.caption_inputs(prefix, prefix_kinds, words)
        prefix_valid = torch.cat([torch.ones_like(prefix_valid[:, :1]), prefix_valid], dim=1)
        num_words = word_indices.shape[1]
        mask = padded_caption_attention_mask(prefix_valid.shape[1], lengths.to(words.device), num_words,
                                             prefix_valid).to(words.device)
        # The layout's positions, with prompt padding squeezed out (as at inference, see generation.start).
        word_positions = prefix_valid.sum(1, keepdim=True) + torch.arange(num_words, device=words.device)
        positions = torch.cat([packed_positions(prefix_valid), word_positions, word_positions], dim=1)
        attributes = decoder_attributes(self.decoder, inputs.modality_ids, IMAGE_TEXT_INPUT,
                                        causal=caption_causal_span(inputs.layout, words.device))
        hidden = self.decoder(inputs.tokens, inputs.modality_ids, positions, attention_mask=mask,
                              attributes=attributes).hidden_states
        queries = self.readout(hidden[:, inputs.layout.queries])
        candidates = self.encode_words(features=vocab_features) if word_embeddings is None else word_embeddings
        return self.readout.similarity(queries, candidates, "caption")

    @torch.no_grad()
    def caption(self, images, beams: int = 1, max_length: int | None = None, prompts: Sequence[str] | None = None,
                return_scores: bool = False) -> list[str] | tuple[list[str], Tensor]:
        """Captions of pictures (PIL, paths, numpy, tensors; see `prepare_images`) by greedy (beams=1) or beam
        search over the caption vocabulary, with the decoder's key/value cache: each step appends the previous word
        to the cache and runs one SPE query. `prompts` condition the text on a prompt after the image (open-ended
        VQA). With `return_scores`, also each caption's log-probability (B,), end of sequence included."""
        from .generation import decode, search

        pixels = self.prepare_images(images)
        if prompts is not None:
            prompts = _text_list(prompts, "prompts", pixels.shape[0])
        result = search(self, pixels, beams=beams, max_length=max_length or self.config.max_caption_length,
                        prompts=prompts)
        texts = decode(self, result.word_indices)
        return (texts, result.scores) if return_scores else texts

    # --------------------------------------------------------------------------------- task front-ends
    @torch.no_grad()
    def classify(self, images, class_names: Sequence[str] | None = None,
                 templates: Sequence[str] = DEFAULT_TEMPLATES, class_embeddings: Tensor | None = None,
                 return_logits: bool = False) -> Tensor:
        """Zero-shot classification: (B, num_classes) probabilities (with `return_logits`, the scaled similarities
        before the softmax). The classes are `class_names` (encoded through `templates`, cached per list) or
        precomputed `class_embeddings` (C, embed_dim), e.g. from `class_embeddings()`."""
        if (class_names is None) == (class_embeddings is None):
            raise ValueError("classify: pass class_names or class_embeddings (one of them)")
        if class_embeddings is None:
            class_embeddings = self.class_embeddings(class_names, templates)
        elif class_embeddings.dim() != 2 or class_embeddings.shape[1] != self.config.embed_dim:
            raise ValueError(f"classify: class_embeddings must be (num_classes, {self.config.embed_dim}), "
                             f"got {tuple(class_embeddings.shape)}")
        image_embeddings = self.encode_image(images)
        logits = self.readout.similarity(image_embeddings, class_embeddings.to(image_embeddings), "classification")
        return logits if return_logits else logits.softmax(dim=-1)

    @torch.no_grad()
    def answer(self, images, questions: Sequence[str] | str, answers: Sequence[str] | None = None,
               beams: int = 1, max_length: int | None = None, return_scores: bool = False
               ) -> list[str] | tuple[list[str], Tensor]:
        """VQA by ranking the candidate `answers` (their embeddings cached per list), or, without them, open-ended
        answers generated word by word conditioned on [image, question] (a model trained with the generative VQA
        loss). With `return_scores`, also each answer's log-probability (B,): among the candidates, or of the
        generated words."""
        pixels = self.prepare_images(images)
        questions = _text_list(questions, "questions", pixels.shape[0])
        if answers is None:
            return self.caption(pixels, beams=beams, max_length=max_length, prompts=questions,
                                return_scores=return_scores)
        answers = _text_list(answers, "answers")
        candidates = self.cached(("texts", tuple(answers)), lambda: self.encode_text(answers))
        log_probs = self.readout.similarity(self.vqa_query(pixels, questions), candidates, "vqa").float().log_softmax(-1)
        scores, best = log_probs.max(dim=-1)
        chosen = [answers[i] for i in best.tolist()]
        return (chosen, scores) if return_scores else chosen

    # ------------------------------------------------------------------------------------------- I/O
    def save_pretrained(self, folder: str | Path) -> Path:
        """config.json + model.safetensors + preprocessor_config.json (the image processor) + the tokenizer and
        text-model config in text_model/ (+ the diffusion branch's UNet, scheduler and VAE in diffusion/, by
        diffusers' own save_pretrained)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.text_encoder.save_text_model(folder / TEXT_FOLDER, weights=False)
        config = self.config.to_dict()
        config["text"]["name_or_path"] = TEXT_FOLDER  # relative: the folder can move
        config["image"]["checkpoint"] = None          # the weights are in model.safetensors
        config["image"]["allow_pickle"] = False       # an opt-in for that file, not for the next one
        left_out: set[str] = set()
        if self.has_diffusion:
            self.diffusion.save_pretrained(folder / DIFFUSION_FOLDER)
            config["diffusion"]["pretrained"] = DIFFUSION_FOLDER  # relative, as the text model
            left_out = set(self.diffusion.exported_state_keys("diffusion."))
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        self.image_processor.save_pretrained(folder)
        _save_weights(self, folder / WEIGHTS_FILE, left_out)
        return folder

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None) -> "UniPerceiver":
        """A saved model from a local folder or a hub id ("org/name", through huggingface_hub; HF_HUB_OFFLINE
        respected), in eval mode, on `device` (default the CPU) in `dtype` (default as saved, float32; "bfloat16"
        runs on CPUs that support it). The model is built with its parameters on the meta device and the file's
        tensors assigned to it, so loading needs about one copy of the weights in memory."""
        from .pretrained import (load_assigned, parameters_on_meta, read_safetensors, resolve_model_folder,
                                 tensors_on_meta)

        folder = resolve_model_folder(name_or_path)
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, TEXT_FOLDER) if not (folder / name).exists()]
        if missing:
            raise FileNotFoundError(f"UniPerceiver.from_pretrained({folder}): missing {missing}; a saved model "
                                    f"folder holds {CONFIG_FILE}, {WEIGHTS_FILE} and {TEXT_FOLDER}/")
        try:
            data = json.loads((folder / CONFIG_FILE).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{folder / CONFIG_FILE}: not valid JSON ({error})") from error
        if not isinstance(data, dict) or "architecture" not in data:
            kind = data.get("model_type") or data.get("_class_name") if isinstance(data, dict) else None
            raise ValueError(f"{folder / CONFIG_FILE}: names no architecture"
                             f"{f' (it describes a {kind!r} model)' if kind else ''}; a UniPerceiver folder is "
                             "written by UniPerceiver.save_pretrained")
        config = UniPerceiverConfig.from_dict(data, source=str(folder / CONFIG_FILE))
        config.text.name_or_path = str(folder / TEXT_FOLDER)
        diffusion_root = None
        if config.diffusion is not None:
            diffusion_root = folder / DIFFUSION_FOLDER
            if not diffusion_root.is_dir():
                raise FileNotFoundError(f"UniPerceiver.from_pretrained({folder}): {CONFIG_FILE} has a diffusion "
                                        f"branch but the folder has no {DIFFUSION_FOLDER}/")
        dtype = _torch_dtype(dtype)
        with parameters_on_meta():
            model = cls(replace(config, diffusion=None), load_text_weights=False, load_image_checkpoint=False)
        model.config = config
        if config.diffusion is not None:  # diffusers loads its own folder (weights included) for real
            model.diffusion = DiffusionBranch(config.diffusion, config.decoder.width, diffusion_root)
        state = read_safetensors(folder / WEIGHTS_FILE, torch.device(device or "cpu"), dtype)
        try:
            missing_keys, unexpected = load_assigned(model, state)
        except RuntimeError as error:  # shape mismatches
            raise ValueError(f"{folder / WEIGHTS_FILE} does not fit the model of {folder / CONFIG_FILE}: "
                             f"{error}") from error
        if model.has_diffusion:  # diffusers loaded these from diffusion/; the EMA starts as the exported UNet
            exported = set(model.diffusion.exported_state_keys("diffusion."))
            missing_keys = [key for key in missing_keys if key not in exported]
        if missing_keys or unexpected:
            raise ValueError(f"{folder / WEIGHTS_FILE} does not fit the model of {folder / CONFIG_FILE}: "
                             f"missing {sorted(missing_keys)[:10]}, unexpected {sorted(unexpected)[:10]}")
        empty = tensors_on_meta(model)
        if empty:
            raise ValueError(f"{folder / WEIGHTS_FILE}: no values for {empty[:10]}")
        if (folder / PROCESSOR_FILE).exists():
            model.image_processor = ImageProcessor.from_pretrained(folder)
        model.to(device=device, dtype=dtype)  # the diffusion branch and the built buffers; no copy of the rest
        return model.eval()
