"""BLIP-2 for training and export, readable top to bottom.

    from train.blip2.model import Blip2Edge
    model = Blip2Edge.from_pretrained("checkpoints/stage1")     # ours, or a real HF BLIP-2 folder
    model = Blip2Edge.from_config(blip2_config("tiny"), EdgeConfig(stage=1))   # fresh weights
    model.save_pretrained("checkpoints/stage1")

The model is assembled from Hugging Face modules where they exist (ViT, the
Q-Former's layers and text embeddings, the ITC projections and ITM head, OPT,
the language projection), so its checkpoints are HF `save_pretrained` folders:
stage 1 loads with `Blip2ForImageTextRetrieval`, stage 2 with
`Blip2ForConditionalGeneration`. What HF lacks is here:

  * one Q-Former forward that takes any self-attention mask and a KV cache, so
    the three BLIP-2 modes (ITC unimodal, ITM bi-directional, ITG multimodal
    causal; masks from `train.blip2.masks.qformer_mask`) run through the same code in
    training and export;
  * the ITG text-decoder head and the ITC temperature, saved beside the HF
    weights in `blip2_edge_heads.safetensors`, described by `blip2_edge.json`.

Shapes: B batch, Nq queries, Np image patches (+1 class token), T text tokens,
P cached text tokens, Dv/Dq/Dl vision/Q-Former/LLM widths, H heads, d head width.
"""
import copy
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from train.blip2.families import family
from train.blip2.masks import causal_lm_mask, qformer_mask

EDGE_CONFIG = "blip2_edge.json"
EDGE_WEIGHTS = "blip2_edge_heads.safetensors"
HF_CLASS = {1: Blip2ForImageTextRetrieval, 2: Blip2ForConditionalGeneration}


def _load_hf(hf_class, path: Path, config: Blip2Config, attn_implementation: str) -> nn.Module:
    """The Hugging Face model of a folder in float32, its safetensors read one tensor at a time (pread): a
    memory-mapped checkpoint's pages count in the process's memory while it is open, so loading a float16
    checkpoint as float32 the usual way peaked at 1.65x the float32 weights (the 677M blip2-opt-2.7b variant);
    this way at about 1.2x, the libraries included. Folders with other weight files load the usual way."""
    from safetensors import safe_open
    from transformers import GenerationConfig

    files = sorted(f for f in path.glob("*.safetensors") if f.name != EDGE_WEIGHTS)
    if not files:
        return hf_class.from_pretrained(path, attn_implementation=attn_implementation, dtype=torch.float32)
    handles = [safe_open(str(f), framework="pt", device="cpu", backend="pread") for f in files]
    try:
        weights = {k: h.get_slice(k) for h in handles for k in h.keys()}
        hf = hf_class.from_pretrained(None, config=config, state_dict=weights, attn_implementation=attn_implementation,
                                      dtype=torch.float32)
    finally:
        for h in handles:
            h.__exit__(None, None, None)
    if hf.can_generate() and (path / "generation_config.json").is_file():
        hf.generation_config = GenerationConfig.from_pretrained(path)
    return hf


@dataclass
class EdgeConfig:
    """What Hugging Face's BLIP-2 config does not say; saved as blip2_edge.json beside config.json."""
    stage: int = 1  # 1: Q-Former pre-training (ITC/ITM/ITG); 2: connected to the LLM (LM loss)
    qformer_text: bool = True  # Q-Former text embeddings + ITC/ITM heads present
    itg_head: bool = True  # the ITG text-decoder head present
    temp: float = 0.07  # initial ITC temperature
    cls_token_id: int = 2  # Q-Former tokenizer: [CLS] starts ITC/ITM texts
    sep_token_id: int = 3  # ... [SEP] ends them (and ends ITG generation)
    dec_token_id: int = 5  # ... [DEC] replaces [CLS] for ITG
    pad_token_id: int = 0
    max_text_tokens: int = 32  # Q-Former text length limit ([CLS]/[DEC] and [SEP] included)

    @classmethod
    def load(cls, path: Path, config: Blip2Config) -> "EdgeConfig":
        """blip2_edge.json if present, else what a plain HF folder holds (stage from its architecture)."""
        f = Path(path) / EDGE_CONFIG
        if f.is_file():
            data = json.loads(f.read_text())
            return cls(**{k.name: data[k.name] for k in fields(cls) if k.name in data})
        arch = (config.architectures or ["Blip2ForConditionalGeneration"])[0]
        stage = 1 if arch == "Blip2ForImageTextRetrieval" else 2
        q = config.qformer_config
        # BLIP-2's own Q-Former tokenizer is bert-base-uncased: [PAD]=0, [CLS]=101, [SEP]=102
        return cls(stage=stage, qformer_text=stage == 1, itg_head=False, cls_token_id=101, sep_token_id=102,
                   dec_token_id=q.vocab_size - 1, pad_token_id=q.pad_token_id or 0,
                   max_text_tokens=min(q.max_position_embeddings, 512))


class ItgHead(nn.Module):
    """BERT-style LM head of the Q-Former's text decoder (BLIP-2's ITG): transform, then vocabulary logits."""

    def __init__(self, hidden: int, vocab: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x):  # [B, T, Dq] -> [B, T, V]
        return self.decoder(self.layer_norm(F.gelu(self.dense(x))))


# ---------------------------------------------------------------- the Q-Former forward, any mask, KV cache
def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)  # [B, T, D] -> [B, H, T, d]


def _attend(att, q, k, v, mask):
    """Scaled dot-product attention exactly as HF's eager path; q/k/v [B,H,*,d], mask additive or None."""
    scores = q @ k.transpose(-1, -2) * att.scaling  # [B, H, Tq, Tk]
    if mask is not None:
        scores = scores + mask
    probs = F.dropout(scores.softmax(-1), att.attention_dropout, att.training)
    out = probs @ v  # [B, H, Tq, d]
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)  # [B, Tq, D]


def self_attention(block, x, mask, past=None, rows=None):
    """Self-attention + output (dense, residual, LayerNorm). past: (k, v) [B,H,P,d] prepended to the keys.
    rows: compute the output of the first `rows` positions only (keys and values still come from all)."""
    att = block.attention
    asking = x if rows is None else x[:, :rows]
    q = _split_heads(att.query(asking), att.attention_head_size)
    k = _split_heads(att.key(x), att.attention_head_size)
    v = _split_heads(att.value(x), att.attention_head_size)
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    if rows is not None and mask is not None:
        mask = mask[:, :, :rows]
    return block.output(_attend(att, q, k, v, mask), asking), (k, v)


def cross_attention(block, x, image_embeds):
    """Queries attend to every image patch."""
    att = block.attention
    q = _split_heads(att.query(x), att.attention_head_size)
    k = _split_heads(att.key(image_embeds), att.attention_head_size)
    v = _split_heads(att.value(image_embeds), att.attention_head_size)
    return block.output(_attend(att, q, k, v, None), x)


def cross_attention_absorbed(block, x, image_embeds):
    """cross_attention in fewer operations where each image meets one set of queries (one text against many
    images; where one image meets many, as in itm_one_image, its keys/values computed once cost less). Inference
    only: no attention dropout. The key and value projections are folded into the queries' side ("weight
    absorption"): each head's queries are mapped into the image's space (q W_k), score the image embeddings
    directly, read a weighted sum of them, and only that sum goes through W_v. Per image this costs about
    heads x Nq / hidden of the key/value projections it replaces (128/256 for the small preset, 384/768 for
    BLIP-2's Q-Former). The same output up to float rounding: the key bias adds one constant to each query's
    scores, which softmax ignores, and the attention weights of a query sum to 1, so the value bias passes
    through unchanged. x may have batch 1 (shared queries): its projections are then computed once and
    broadcast over the images."""
    att = block.attention
    heads, d = att.num_attention_heads, att.attention_head_size
    q = _split_heads(att.query(x), d)  # [B, H, Nq, d]
    q_image = (q @ att.key.weight.view(heads, d, -1)).flatten(1, 2)  # [B, H*Nq, Dv]
    probs = (q_image @ image_embeds.transpose(1, 2) * att.scaling).softmax(-1)  # [B, H*Nq, Np]
    read = (probs @ image_embeds).unflatten(1, (heads, -1))  # [B, H, Nq, Dv]
    out = read @ att.value.weight.view(heads, d, -1).transpose(1, 2) + att.value.bias.view(heads, 1, d)
    return block.output(out.transpose(1, 2).flatten(2), x)  # [B, Nq, Dq]


def qformer_layer(layer, x, mask, image_embeds, num_queries: int, has_text: bool, past=None, rows=None,
                  cross=cross_attention):
    """One Q-Former layer over [queries; text]: queries go through cross-attention and the query FFN,
    text through the text FFN. Returns the new hidden states and this layer's self-attention (k, v).
    rows (with has_text=False): the queries' outputs only, though they still attend to the text.
    cross: cross_attention, or cross_attention_absorbed (the same in fewer operations, inference only)."""
    h, kv = self_attention(layer.attention, x, mask, past, rows)
    parts = []
    if num_queries:
        q = h[:, :num_queries]
        if layer.has_cross_attention:
            q = cross(layer.crossattention, q, image_embeds)
        parts.append(layer.feed_forward_chunk_query(q))
    if has_text:
        parts.append(layer.feed_forward_chunk(h[:, num_queries:]))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0], kv


class Blip2Edge(nn.Module):
    """BLIP-2 (either stage) with every Q-Former mode. Attribute names follow Hugging Face's classes."""

    def __init__(self, config: Blip2Config, edge: EdgeConfig, hf: nn.Module | None = None):
        super().__init__()
        self.config, self.edge = config, edge
        if edge.qformer_text:
            config.qformer_config.use_qformer_text_input = True
        fresh = hf is None
        hf = HF_CLASS[edge.stage](config) if fresh else hf
        for name, module in hf.named_children():
            self.add_module(name, module)
        self.query_tokens = hf.query_tokens  # [1, Nq, Dq]
        self.__dict__["_hf"] = hf  # the Hugging Face model of this stage shares every module; not registered twice
        if fresh:  # HF starts the queries at zero: identical queries get identical gradients and never part
            nn.init.normal_(self.query_tokens, std=config.qformer_config.initializer_range)
            if edge.stage == 2:
                family(config).untie_fresh(self.language_model)
        q = config.qformer_config
        if edge.qformer_text and not hasattr(self, "embeddings"):  # stage 2 keeps stage 1's text side
            self.embeddings = Blip2TextEmbeddings(q)
            self.vision_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
            self.text_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
            self.itm_head = nn.Linear(q.hidden_size, 2)
        if edge.itg_head:
            self.itg_head = ItgHead(q.hidden_size, q.vocab_size, q.layer_norm_eps)
        self.temp = nn.Parameter(torch.tensor(float(edge.temp)))

    @property
    def num_queries(self) -> int:
        return self.config.num_query_tokens

    # ------------------------------------------------------------ image side
    def encode_image(self, pixel_values):  # [B, 3, H, W] -> [B, Np, Dv]
        return self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state

    def qformer_forward(self, embeds, mask, image_embeds, num_queries: int, has_text: bool, past=None):
        """LayerNorm + dropout on the input embeddings, then every layer. Returns hidden, [(k, v) per layer]."""
        x = self.qformer.dropout(self.qformer.layernorm(embeds))
        presents = []
        for i, layer in enumerate(self.qformer.encoder.layer):
            x, kv = qformer_layer(layer, x, mask, image_embeds, num_queries, has_text, past[i] if past else None)
            presents.append(kv)
        return x, presents

    def query_forward(self, image_embeds):
        """Queries alone (what ITC, ITG and the LLM see): -> query_output [B,Nq,Dq], per-layer (k, v) [B,H,Nq,d]."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer_forward(queries, None, image_embeds, self.num_queries, has_text=False)

    def image_feats(self, query_output):  # [B, Nq, Dq] -> [B, Nq, D] unit vectors (ITC)
        return F.normalize(self.vision_projection(query_output), dim=-1)

    def soft_prompt(self, query_output):  # [B, Nq, Dq] -> [B, Nq, Dl] (stage 2)
        return self.language_projection(query_output)

    def llm_inputs_embeds(self, input_ids, soft_prompt):
        """The LLM's input embeddings [B, T, Dl]: row b's first Nq image placeholders hold its soft prompt
        (soft_prompt [B, Nq, Dl]), every other id its embedding. Nq may be 0 (a decode step): a generated
        token equal to the placeholder id is then embedded like any other, as in Hugging Face's generate.
        With exactly Nq placeholders per row this is what Blip2ForConditionalGeneration's masked_scatter does."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        batch, queries, width = soft_prompt.shape
        is_image = input_ids == self.config.image_token_index
        nth = torch.cumsum(is_image.long(), 1) - 1  # which placeholder of its row each position is
        fill = is_image & (nth < queries)
        source = torch.cat([soft_prompt.to(embeds.dtype), embeds.new_zeros(batch, 1, width)], 1)  # never empty
        index = torch.where(fill, nth, queries).unsqueeze(-1).expand(-1, -1, width)
        return torch.where(fill.unsqueeze(-1), torch.gather(source, 1, index), embeds)

    # ------------------------------------------------------------ text side, the three modes
    def text_embeds(self, input_ids, position_ids=None):  # [B, T] -> [B, T, Dq] word + position
        return self.embeddings(input_ids=input_ids, position_ids=position_ids)

    def text_feat(self, input_ids, attention_mask):
        """Unimodal (ITC): text sees only text -> normalised projection of [CLS], [B, D]."""
        mask = qformer_mask("unimodal", attention_mask, 0, self.temp.dtype)
        hidden, _ = self.qformer_forward(self.text_embeds(input_ids), mask, None, 0, has_text=True)
        return F.normalize(self.text_projection(hidden[:, 0]), dim=-1)

    def _joint_inputs(self, mode: str, input_ids, attention_mask, batch: int):
        """The input of a mode where queries and text meet (input_ids, attention_mask [batch, T]): embeddings
        [batch, Nq+T, Dq] of [queries; text] and the mode's additive mask (train.blip2.masks.qformer_mask)."""
        embeds = torch.cat([self.query_tokens.expand(batch, -1, -1), self.text_embeds(input_ids)], 1)
        return embeds, qformer_mask(mode, attention_mask, self.num_queries, embeds.dtype)

    def itm_forward(self, image_embeds, input_ids, attention_mask):
        """Bi-directional (ITM): -> itm_logits [B, 2] (mean over queries), text-conditioned query_output."""
        embeds, mask = self._joint_inputs("bidirectional", input_ids, attention_mask, image_embeds.shape[0])
        hidden, _ = self.qformer_forward(embeds, mask, image_embeds, self.num_queries, has_text=True)
        query_output = hidden[:, : self.num_queries]
        return self.itm_head(query_output).mean(1), query_output

    def itm_one_text(self, image_embeds, input_ids, attention_mask):
        """ITM of one text (input_ids, attention_mask [1, T]) against each of B images: itm_forward's logits
        [B, 2] for the B pairs, with less work per image (text -> image re-ranking). The first layer's
        self-attention sees no image, so it and the first layer's text rows are computed once, at batch 1; every
        cross-attention is cross_attention_absorbed; the last layer computes only the query rows, the only ones
        ITM reads."""
        batch, nq = image_embeds.shape[0], self.num_queries
        first, *rest = self.qformer.encoder.layer  # (a Q-Former has two layers or more)
        embeds, mask = self._joint_inputs("bidirectional", input_ids, attention_mask, 1)  # mask [1,1,S,S]: all images
        h, _ = self_attention(first.attention, self.qformer.dropout(self.qformer.layernorm(embeds)), mask)
        queries = h[:, :nq]  # [1, Nq, Dq]; cross-attention broadcasts it (and its query projection) over the images
        if first.has_cross_attention:
            queries = cross_attention_absorbed(first.crossattention, queries, image_embeds)
        queries = first.feed_forward_chunk_query(queries).expand(batch, -1, -1)
        x = torch.cat([queries, first.feed_forward_chunk(h[:, nq:]).expand(batch, -1, -1)], 1)
        return self._itm_layers(rest, x, mask, image_embeds, cross_attention_absorbed)

    def itm_one_image(self, image_embeds, input_ids, attention_mask):
        """ITM of one image (image_embeds [1, Np, Dv]) against each of B texts (input_ids, attention_mask
        [B, T]): itm_forward's logits [B, 2] for the B pairs, with less work per text (image -> text
        re-ranking): the image's cross-attention keys and values are computed once, at batch 1; the last layer
        computes only the query rows."""
        embeds, mask = self._joint_inputs("bidirectional", input_ids, attention_mask, input_ids.shape[0])
        x = self.qformer.dropout(self.qformer.layernorm(embeds))
        return self._itm_layers(self.qformer.encoder.layer, x, mask, image_embeds)

    def _itm_layers(self, layers, x, mask, image_embeds, cross=cross_attention):
        """The bi-directional pass through `layers` from hidden states x [B, Nq+T, Dq] -> itm_logits [B, 2]; the
        last layer computes only the query rows (image_embeds may have batch 1: broadcast over the rows)."""
        *middle, last = layers
        nq = self.num_queries
        for layer in middle:
            x, _ = qformer_layer(layer, x, mask, image_embeds, nq, has_text=True, cross=cross)
        query_output, _ = qformer_layer(last, x, mask, image_embeds, nq, has_text=False, rows=nq, cross=cross)
        return self.itm_head(query_output).mean(1)

    def itg_logits(self, image_embeds, input_ids, attention_mask):
        """Multimodal causal (ITG), whole sequence at once (training): -> logits [B, T, V] for the next token."""
        embeds, mask = self._joint_inputs("causal", input_ids, attention_mask, image_embeds.shape[0])
        hidden, _ = self.qformer_forward(embeds, mask, image_embeds, self.num_queries, has_text=True)
        return self.itg_head(hidden[:, self.num_queries:])

    def itg_step(self, input_ids, attention_mask, position_ids, past):
        """Multimodal causal with a KV cache (generation): the cache starts as the queries' (k, v) from
        `query_forward` and grows by the text. attention_mask [B, Nq+P+T] covers queries, cached text and
        the T new tokens. -> logits [B, T, V], presents [(k, v) [B,H,Nq+P+T,d] per layer]."""
        mask = causal_lm_mask(attention_mask, input_ids.shape[1], self.temp.dtype)  # [B, 1, T, Nq+P+T]
        embeds = self.text_embeds(input_ids, position_ids)
        hidden, presents = self.qformer_forward(embeds, mask, None, 0, has_text=True, past=past)
        return self.itg_head(hidden), presents

    # ------------------------------------------------------------ I/O
    @classmethod
    def from_config(cls, config: Blip2Config, edge: EdgeConfig) -> "Blip2Edge":
        return cls(config, edge)

    @classmethod
    def from_pretrained(cls, path, attn_implementation: str = "eager") -> "Blip2Edge":
        """Load our folders and real HF BLIP-2 folders alike (float32, eager attention for export)."""
        from safetensors.torch import load_file

        path = Path(path)
        config = Blip2Config.from_pretrained(path)
        edge = EdgeConfig.load(path, config)
        hf = _load_hf(HF_CLASS[edge.stage], path, config, attn_implementation)
        model = cls(hf.config, edge, hf=hf)
        extra = path / EDGE_WEIGHTS
        if extra.is_file():
            missing, unexpected = model.load_state_dict(load_file(str(extra)), strict=False)
            if unexpected:
                raise ValueError(f"{extra} holds weights this model does not have: {unexpected[:5]}")
        return model.eval()

    def hf_model(self, stage: int | None = None) -> nn.Module:
        """The Hugging Face model of a stage (default: this model's), sharing these weights."""
        stage = stage or self.edge.stage
        if stage == self.edge.stage and "_hf" in self.__dict__:
            return self.__dict__["_hf"]
        config = copy.deepcopy(self.config)
        if stage == 1:
            config.image_token_index = None  # HF's retrieval model then takes plain [CLS] text [SEP] ids
        hf = HF_CLASS[stage](config)
        hf.load_state_dict({k: v for k, v in self.state_dict().items() if k in hf.state_dict()}, assign=True)
        if stage == 2:
            family(config).retie(hf.language_model)
        return hf.eval()

    def save_pretrained(self, path, stage: int | None = None) -> None:
        """HF folder (config.json, model.safetensors) + blip2_edge.json + the extra heads. stage=1 saves a
        stage-2 model's Q-Former part as a stage-1 checkpoint (no LLM). Not atomic by itself: callers
        write to a temporary folder and rename."""
        from safetensors.torch import save_file

        path, stage = Path(path), stage or self.edge.stage
        hf = self.hf_model(stage)
        hf.save_pretrained(path)
        hf_keys = set(hf.state_dict())
        skip = ("language_model.", "language_projection.") if stage == 1 else ()
        extra = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if k not in hf_keys and not k.startswith(skip)}
        save_file(extra, str(path / EDGE_WEIGHTS))
        (path / EDGE_CONFIG).write_text(json.dumps(asdict(replace(self.edge, stage=stage)), indent=2))
