"""torch.nn.Module wrappers that give each exported graph flat tensor inputs and outputs.

One wrapper per graph in DESIGN.md; `export/specs.py` pairs each with its
input/output names, dynamic axes and dummy inputs. They are thin: the maths is
Hugging Face's own modules, so any BLIP-2 checkpoint exports the same way.
"""
import torch
from torch import nn
from transformers import DynamicCache

from train.masks import causal_lm_mask


class VisionWrapper(nn.Module):
    """pixel_values [B,3,H,W] -> image_embeds [B,Np,Dv] (ViT incl. post-layernorm)."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state


class QFormerQueryWrapper(nn.Module):
    """image_embeds [B,Np,Dv] -> query_output [B,Nq,Dq], llm_prompt [B,Nq,Dllm] (language projection)."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.language_projection = model.language_projection

    def forward(self, image_embeds):
        batch, patches = image_embeds.shape[:2]
        image_mask = torch.ones(batch, patches, dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(batch, -1, -1)
        query_output = self.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, return_dict=True
        ).last_hidden_state  # [B, Nq, Dq]
        return query_output, self.language_projection(query_output)  # [B, Nq, Dq], [B, Nq, Dllm]


def scatter_soft_prompt(embeds: torch.Tensor, is_image: torch.Tensor, soft_prompt: torch.Tensor) -> torch.Tensor:
    """Put the projected queries where the image placeholder ids are, exactly as HF's `masked_scatter` does.

    embeds [B,T,De], is_image [B,T] bool, soft_prompt [B',Nq,Dllm] (may have Nq = 0 in decode steps).
    `masked_scatter` fills the masked positions, in row-major order over the whole batch, with the
    flattened source. When Dllm == De and every row holds Nq placeholders this is "row b gets
    image b's queries"; for OPT configs with word_embed_proj_dim != hidden_size HF streams the
    flattened projection into the narrower embeddings, and we reproduce that bit for bit.
    """
    batch, length, width = embeds.shape
    flat_src = torch.cat([soft_prompt.reshape(-1), embeds.new_zeros(width)])  # never empty
    rank = torch.cumsum(is_image.reshape(-1).long(), 0) - 1  # [B*T] order of each placeholder
    rank = rank.clamp(min=0).reshape(batch, length, 1)
    index = rank * width + torch.arange(width, device=embeds.device)  # [B, T, De]
    index = index.clamp(max=flat_src.shape[0] - 1)
    gathered = flat_src[index.reshape(-1)].reshape(batch, length, width)
    return torch.where(is_image.unsqueeze(-1), gathered, embeds)


class LlmDecoderWrapper(nn.Module):
    """One graph for prefill and every decode step of the OPT decoder, weights stored once.

    inputs:  input_ids [B,T] (image placeholders where the soft prompt goes), soft_prompt [B,Nq,Dllm]
             (Nq = 0 in decode steps), attention_mask [B,P+T], position_ids [B,T],
             past_key_i / past_value_i [B,H,P,hd] for every layer i (P = 0 at prefill).
    outputs: logits [B,V] of the last position, present_key_i / present_value_i [B,H,P+T,hd].
    """

    def __init__(self, model):
        super().__init__()
        self.lm = model.language_model
        self.image_token_id = model.config.image_token_index
        self.num_layers = model.config.text_config.num_hidden_layers

    def forward(self, input_ids, soft_prompt, attention_mask, position_ids, *past):
        embeds = self.lm.get_input_embeddings()(input_ids)  # [B, T, De]
        embeds = scatter_soft_prompt(embeds, input_ids == self.image_token_id, soft_prompt.to(embeds.dtype))
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        mask = causal_lm_mask(attention_mask, input_ids.shape[1], embeds.dtype)  # [B, 1, T, P+T]
        out = self.lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
            use_cache=True, return_dict=True,
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits[:, -1, :], *presents)
