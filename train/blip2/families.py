"""The two kinds of frozen LLM BLIP-2 connects to, one adapter each (picked by `text_config.model_type`).

    from train.blip2.families import family
    f = family(model.config)              # DecoderOnly (OPT) or EncoderDecoder (T5)
    f.stage2_batch(layout, tokenizer, [(prompt or None, target), ...])   # tensors for stage 2's loss
    f.stage2_loss(model, soft_prompt, batch)
    f.problem(config)                     # why a checkpoint cannot be deployed, or None

Decoder-only (OPT): the projected queries replace the placeholders at the start of the decoder's input, then
BOS (a caption) or the prompt; the loss is the language-modelling loss on the target that follows.
Encoder-decoder (T5): the queries and the prompt (the text's prefix) go into the encoder, the decoder
generates the rest from `decoder_start_token_id`; stage 2's loss is BLIP-2's prefix language-modelling loss,
on the suffix only. For export, T5 runs one step at a time with caches held outside the model
(`encode`, `cross_kv`, `decoder_step`), written from Hugging Face's own modules.
"""
import torch
import torch.nn.functional as F

from train.blip2.masks import additive


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False).input_ids


def padded_rows(rows: list[list[int]], labels: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """Token rows and their per-token labels (-100 where not scored) -> right-padded input_ids, attention_mask
    and labels [B, T], labels -100 on the padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], mask[i, : len(r)], lab[i, : len(l)] = torch.tensor(r), 1, torch.tensor(l)
    return ids, mask, lab


class DecoderOnly:
    name = "opt"
    padding = "left"  # prompts of a batch are left-padded for generation

    def problem(self, config) -> str | None:
        t = config.text_config
        if t.bos_token_id is None or t.eos_token_id is None or t.pad_token_id is None:
            return ("text_config must set bos_token_id, eos_token_id and pad_token_id (a caption starts from BOS, "
                    "ends at EOS, and batches are padded with PAD)")
        if t.hidden_size != t.word_embed_proj_dim:
            return (f"its language_projection outputs hidden_size={t.hidden_size} values per query, but OPT's input "
                    f"embeddings are word_embed_proj_dim={t.word_embed_proj_dim} wide (OPT-350m style). Hugging Face's "
                    f"BLIP-2 then streams one image's projection into the next row of the batch, so a caption depends "
                    f"on the other images. Use an OPT whose word_embed_proj_dim equals hidden_size (every published "
                    f"BLIP-2 OPT checkpoint does), or retrain the projection to word_embed_proj_dim outputs")
        return None

    def position_room(self, config) -> int | None:
        """Tokens the position table leaves for the prompt and the generated text."""
        return config.text_config.max_position_embeddings - config.num_query_tokens

    def shape(self, config) -> dict:
        """What the runtime needs of the LLM's shape: the decoder's KV cache and the soft prompt's width."""
        t = config.text_config
        return {"num_layers": t.num_hidden_layers, "num_heads": t.num_attention_heads,
                "head_dim": t.hidden_size // t.num_attention_heads, "hidden_size": t.hidden_size,
                "max_positions": t.max_position_embeddings, "decoder_start_token_id": None}

    def untie_fresh(self, lm) -> None:
        """Nothing to do: OPT ties or unties as its config says."""

    def retie(self, lm) -> None:
        """After weights were assigned one by one: tie the LM head to the embeddings if the config ties them."""
        lm.tie_weights()

    def caption_example(self, caption: str, rng) -> tuple[str | None, str]:
        return None, caption  # the whole caption follows the soft prompt and BOS

    def stage2_batch(self, layout, tok, examples) -> dict:
        """Decoder rows laid out as at inference (placeholders, BOS or the prompt), then target and EOS;
        right-padded; labels on target + EOS only."""
        rows, labels = [], []
        for prompt, target in examples:
            head = layout.row(None if prompt is None else _ids(tok, [prompt])[0])
            tail = _ids(tok, [target if prompt is None else " " + target])[0] + [tok.eos_token_id]
            rows.append(head + tail)
            labels.append([-100] * len(head) + tail)
        ids, mask, lab = padded_rows(rows, labels, tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}

    def stage2_loss(self, model, soft_prompt, batch) -> torch.Tensor:
        embeds = model.llm_inputs_embeds(batch["input_ids"], soft_prompt)
        logits = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                      return_dict=True).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100)


class EncoderDecoder:
    name = "t5"
    padding = "right"  # encoder rows: right-padded, as T5's tokenizer pads (no gap between image and text)

    def problem(self, config) -> str | None:
        t = config.text_config
        if getattr(t, "decoder_start_token_id", None) is None:
            return ("text_config.decoder_start_token_id is not set: T5's decoder starts every answer from it; set "
                    "it in config.json (T5 uses 0, its pad id)")
        if getattr(t, "bos_token_id", None) is None:
            return ("text_config.bos_token_id is not set: Hugging Face's BLIP-2 ends a caption's encoder input with it "
                    "(generate(pixel_values) fails without it); set it in config.json (BLIP-2's T5 checkpoints use 1, "
                    "T5's </s>)")
        if t.eos_token_id is None or t.pad_token_id is None:
            return "text_config must set eos_token_id and pad_token_id (T5: 1 and 0)"
        return None

    def position_room(self, config) -> int | None:
        return None  # relative positions: no table to outgrow

    def shape(self, config) -> dict:
        t = config.text_config
        return {"num_layers": t.num_decoder_layers, "num_heads": t.num_heads, "head_dim": t.d_kv,
                "hidden_size": t.d_model, "max_positions": None, "decoder_start_token_id": t.decoder_start_token_id}

    def untie_fresh(self, lm) -> None:
        """transformers 5 builds every T5 with its LM head tied to the embeddings; Flan-T5's (not scaled:
        scale_decoder_outputs False) has weights of its own, so a fresh one gets them, at d_model ** -0.5: logits
        of unit scale at the start, as the original T5's output scaling gives its tied head (at HF's std 1 a
        fresh model starts near a loss of 30)."""
        if not lm.config.scale_decoder_outputs:
            weight = torch.empty_like(lm.lm_head.weight)
            torch.nn.init.normal_(weight, std=lm.config.d_model ** -0.5)
            lm.lm_head.weight = torch.nn.Parameter(weight)

    def retie(self, lm) -> None:
        """transformers 5 ties every T5 head; only the original T5's (scaled) is tied, Flan-T5's keeps its own."""
        if lm.config.scale_decoder_outputs:
            lm.tie_weights()

    def caption_example(self, caption: str, rng) -> tuple[str | None, str]:
        """Prefix LM: half the captions are generated whole from the soft prompt (what captioning asks), the
        others from a prefix of their first words, which goes to the encoder."""
        words = caption.split()
        cut = 0 if len(words) < 2 or rng.random() < 0.5 else int(rng.integers(1, len(words)))
        return (" ".join(words[:cut]) or None), " ".join(words[cut:])

    def stage2_batch(self, layout, tok, examples) -> dict:
        """Encoder rows as at inference (placeholders, then BOS or the prefix with T5's </s>), right-padded; the
        suffix and EOS are the decoder's labels."""
        rows = [layout.row(None if prefix is None else _ids(tok, [prefix])[0]) for prefix, _ in examples]
        targets = [ids + [tok.eos_token_id] for ids in _ids(tok, [t for _, t in examples])]
        ids, mask, _ = padded_rows(rows, [[-100] * len(r) for r in rows], tok.pad_token_id)
        _, _, labels = padded_rows(targets, targets, tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def stage2_loss(self, model, soft_prompt, batch) -> torch.Tensor:
        embeds = model.llm_inputs_embeds(batch["input_ids"], soft_prompt)
        return model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                    labels=batch["labels"], return_dict=True).loss

    # ------------------------------------------------------------ one step at a time, caches outside (export)
    @staticmethod
    def encode(lm, inputs_embeds, attention_mask):
        """The encoder over the soft prompt and the prompt: [B, S, D]."""
        return lm.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True
                          ).last_hidden_state

    @staticmethod
    def cross_kv(lm, encoder_states) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys and values of the encoder states, [B, H, S, d] each:
        computed once per image, fed to every decoder step."""
        out = []
        for block in lm.decoder.block:
            att = block.layer[1].EncDecAttention
            out.append((_heads(att.k(encoder_states), att.key_value_proj_dim),
                        _heads(att.v(encoder_states), att.key_value_proj_dim)))
        return out

    @staticmethod
    def decoder_step(lm, input_ids, encoder_mask, cross, past, self_mask=None):
        """T new decoder tokens after `past` cached ones: -> logits [B, T, V], per layer (k, v) [B, H, P+T, d].
        The self-attention's relative position bias is computed for the cached positions (query i of this step is
        position P + i), as Hugging Face's decoder computes it with its cache. `self_mask` [B, P+T] (1: a real
        token): rows of a batch that are shorter than others are padded on the left, so each row's tokens keep
        their distances to the query, and the padding is masked (runtime.engine merges rows of different lengths)."""
        dec, steps = lm.decoder, input_ids.shape[1]
        cached = past[0][0].shape[2]
        x = dec.embed_tokens(input_ids)
        allowed = torch.arange(cached + steps)[None, :] <= torch.arange(steps)[:, None] + cached  # [T, P+T]
        if self_mask is not None:
            allowed = (allowed[None] & self_mask.bool()[:, None, :])[:, None]  # [B, 1, T, P+T]
        self_bias = (dec.block[0].layer[0].SelfAttention.compute_bias(steps, cached + steps, past_seen_tokens=cached)
                     + additive(allowed, x.dtype))  # [1 or B, H, T, P+T]
        cross_bias = additive(encoder_mask.bool(), x.dtype)[:, None, None, :]  # [B, 1, 1, S]
        presents = []
        for block, (ck, cv), (pk, pv) in zip(dec.block, cross, past):
            self_layer, cross_layer, ffn = block.layer
            h = self_layer.layer_norm(x)
            att = self_layer.SelfAttention
            k = torch.cat([pk, _heads(att.k(h), att.key_value_proj_dim)], 2)
            v = torch.cat([pv, _heads(att.v(h), att.key_value_proj_dim)], 2)
            x = x + att.o(_attend(_heads(att.q(h), att.key_value_proj_dim), k, v, self_bias))
            att = cross_layer.EncDecAttention
            q = _heads(att.q(cross_layer.layer_norm(x)), att.key_value_proj_dim)
            x = x + att.o(_attend(q, ck, cv, cross_bias))
            x = ffn(x)  # T5LayerFF: layer norm, FFN, residual
            presents.append((k, v))
        x = dec.final_layer_norm(x)
        if lm.config.scale_decoder_outputs:  # original T5: tied embeddings, output scaled
            x = x * lm.config.d_model ** -0.5
        return lm.lm_head(x), presents


def _heads(x, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)  # [B, T, H*d] -> [B, H, T, d]


def _attend(q, k, v, bias) -> torch.Tensor:
    """T5 attention: no 1/sqrt(d) scaling (T5 folds it into its weights), the bias carries positions and masks."""
    probs = (q @ k.transpose(-1, -2) + bias).softmax(-1)
    out = probs @ v  # [B, H, T, d]
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


FAMILIES = {"opt": DecoderOnly(), "t5": EncoderDecoder()}


def family(config):
    """The adapter of a stage-2 Blip2Config's LLM; a ValueError names the families there are."""
    kind = config.text_config.model_type
    if kind not in FAMILIES:
        raise ValueError(f"the language model is {kind!r}; blip2-edge supports {', '.join(FAMILIES)} (BLIP-2 OPT "
                         f"checkpoints such as Salesforce/blip2-opt-2.7b, Flan-T5 ones such as "
                         f"Salesforce/blip2-flan-t5-xl)")
    return FAMILIES[kind]
