"""torch.nn.Module wrappers that give each exported graph flat tensor inputs and outputs.

One wrapper per graph of docs/architecture.md; `export/specs.py` pairs each with its
input/output names, dynamic axes and dummy inputs. They are thin: the maths is
Hugging Face's own modules, so any BLIP-2 checkpoint exports the same way.
"""
from torch import nn
from transformers import DynamicCache

from train.blip2.families import EncoderDecoder
from train.blip2.masks import causal_lm_mask


class VisionWrapper(nn.Module):
    """pixel_values [B,3,H,W] -> image_embeds [B,Np,Dv] (ViT incl. post-layernorm)."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state


def query_outputs(model) -> list[str]:
    """What the qformer_query graph returns for this model: the parts whose weights exist."""
    names = ["query_output"]
    if hasattr(model, "language_projection"):
        names.append("llm_prompt")
    if hasattr(model, "vision_projection"):
        names.append("image_feats")
    if hasattr(model, "itg_head"):
        names.append("query_kv")  # expanded to query_key_i / query_value_i per layer
    return names


class QFormerQueryWrapper(nn.Module):
    """image_embeds [B,Np,Dv] -> query_output [B,Nq,Dq], then where the weights exist: llm_prompt [B,Nq,Dllm]
    (stage-2 soft prompt), image_feats [B,Nq,D] (normalised ITC features), query_key_i / query_value_i
    [B,H,Nq,d] (the queries' self-attention keys/values, the ITG graph's initial cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.outputs = query_outputs(model)

    def forward(self, image_embeds):
        query_output, kv = self.model.query_forward(image_embeds)
        out = [query_output]
        if "llm_prompt" in self.outputs:
            out.append(self.model.soft_prompt(query_output))
        if "image_feats" in self.outputs:
            out.append(self.model.image_feats(query_output))
        if "query_kv" in self.outputs:
            out += [t for pair in kv for t in pair]
        return tuple(out)


class QFormerTextWrapper(nn.Module):
    """Unimodal mode (ITC text side): input_ids [B,T], attention_mask [B,T] -> text_feat [B,D] (normalised [CLS])."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.text_feat(input_ids, attention_mask)


class QFormerItmWrapper(nn.Module):
    """Bi-directional mode: image_embeds, input_ids [B,T], attention_mask [B,T] -> itm_logits [B,2],
    query_output [B,Nq,Dq] (text-conditioned queries) and, for stage 2, llm_prompt [B,Nq,Dllm]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_embeds, input_ids, attention_mask):
        itm_logits, query_output = self.model.itm_forward(image_embeds, input_ids, attention_mask)
        if hasattr(self.model, "language_projection"):
            return itm_logits, query_output, self.model.soft_prompt(query_output)
        return itm_logits, query_output


class QFormerItmOneWrapper(nn.Module):
    """Bi-directional mode, one side against a batch of the other (retrieval's re-rank) -> itm_logits [B,2],
    qformer_itm's logits for the B pairs with the work they share done once. one="text": image_embeds [B,Np,Dv],
    input_ids / attention_mask [1,T] (text -> image; train.blip2.model.Blip2Edge.itm_one_text); one="image":
    image_embeds [1,Np,Dv], input_ids / attention_mask [B,T] (image -> text; Blip2Edge.itm_one_image)."""

    def __init__(self, model, one: str):
        super().__init__()
        self.model, self.one = model, one

    def forward(self, image_embeds, input_ids, attention_mask):
        return getattr(self.model, f"itm_one_{self.one}")(image_embeds, input_ids, attention_mask)


class QFormerItgWrapper(nn.Module):
    """Multimodal causal mode with a KV cache (Q-Former captioning): input_ids [B,T], attention_mask
    [B,P+T], position_ids [B,T], past_key_i / past_value_i [B,H,P,d] (P counts the queries, whose
    keys/values come from qformer_query) -> logits [B,V] of the last position, present_key_i / value_i."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.qformer_config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        logits, presents = self.model.itg_step(input_ids, attention_mask, position_ids, pairs)
        return (logits[:, -1, :], *[t for pair in presents for t in pair])


class LlmDecoderWrapper(nn.Module):
    """One graph for prefill and every decode step of the OPT decoder, weights stored once.

    inputs:  input_ids [B,T] (image placeholders where the soft prompt goes), soft_prompt [B,Nq,Dllm]
             (Nq = 0 in decode steps: a generated placeholder id is then embedded like any other id; see
             train.blip2.model.Blip2Edge.llm_inputs_embeds), attention_mask [B,P+T], position_ids [B,T],
             past_key_i / past_value_i [B,H,P,hd] for every layer i (P = 0 at prefill).
    outputs: logits [B,V] of the last position, present_key_i / present_value_i [B,H,P+T,hd].
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.text_config.num_hidden_layers

    def forward(self, input_ids, soft_prompt, attention_mask, position_ids, *past):
        embeds = self.model.llm_inputs_embeds(input_ids, soft_prompt)  # [B, T, De]
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        mask = causal_lm_mask(attention_mask, input_ids.shape[1], embeds.dtype)  # [B, 1, T, P+T]
        out = self.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
            return_dict=True,
        )
        presents = []
        for layer in out.cache.layers:
            presents += [layer.keys, layer.values]
        return (out.logits[:, -1, :], *presents)


class Seq2SeqEncoderWrapper(nn.Module):
    """The encoder-decoder LLM's encoder (T5): input_ids [B,S] (placeholders where the soft prompt goes),
    soft_prompt [B,Nq,D], attention_mask [B,S] -> cross_key_i / cross_value_i [B,H,S,d] of every decoder layer,
    computed once per image (train.blip2.families.EncoderDecoder)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, soft_prompt, attention_mask):
        lm = self.model.language_model
        states = EncoderDecoder.encode(lm, self.model.llm_inputs_embeds(input_ids, soft_prompt), attention_mask)
        return tuple(t for pair in EncoderDecoder.cross_kv(lm, states) for t in pair)


class Seq2SeqDecoderWrapper(nn.Module):
    """One graph for every step of the encoder-decoder LLM's decoder (T5): input_ids [B,T], encoder_attention_mask
    [B,S], attention_mask [B,P+T] (the decoder's own tokens: 0 for left padding), cross_key_i / cross_value_i
    [B,H,S,d], past_key_i / past_value_i [B,H,P,d] -> logits [B,V] of the last position, present_key_i /
    present_value_i [B,H,P+T,d]; the relative position bias counts the cached tokens."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.text_config.num_decoder_layers

    def forward(self, input_ids, encoder_attention_mask, attention_mask, *caches):
        n = self.num_layers
        cross = [(caches[2 * i], caches[2 * i + 1]) for i in range(n)]
        past = [(caches[2 * (n + i)], caches[2 * (n + i) + 1]) for i in range(n)]
        logits, presents = EncoderDecoder.decoder_step(self.model.language_model, input_ids, encoder_attention_mask,
                                                       cross, past, attention_mask)
        return (logits[:, -1, :], *[t for pair in presents for t in pair])
