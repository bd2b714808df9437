"""An official-style KaLM-Reranker-V1 scorer for the low-precision parity tests, written from the contract of the
official ``kalm_reranker.py`` (not from kalm_batch):

* the joint model is loaded with ``AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype)`` and then only its
  floating-point *parameters* are cast to ``dtype`` (buffers keep the dtype from_pretrained gave them: the RoPE
  ``inv_freq`` tables stay float32);
* encoder input "<Document>: " + text, right padding, truncated to ``max_length``, no special tokens;
* mask-aware mean pooling over runs of ``chunk_size`` encoder states (no pooling for ``None``);
* the decoder prompt of the official chat template, query truncated to ``query_max_length`` tokens, decoder batch
  padded to a multiple of 8;
* full-vocabulary logits (softcapped by the model), the yes/no columns at each pair's last prompt token, in float32,
  then a two-way softmax: P(yes).

Pairs are sorted by descending character length and cut into batches of ``batch_size``, like the official class.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.modeling_outputs import BaseModelOutput

SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')
INSTRUCTION = "Given a query, retrieve documents that answer the query."


def parameters_only(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def chunk_mean(states: torch.Tensor, mask: torch.Tensor, r: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if r is None:
        return states, mask
    b, n, d = states.shape
    chunks = -(-n // r)
    states = torch.nn.functional.pad(states, (0, 0, 0, chunks * r - n)).view(b, chunks, r, d)
    mask = torch.nn.functional.pad(mask, (0, chunks * r - n)).view(b, chunks, r)
    summed = (states * mask.unsqueeze(-1).to(states.dtype)).sum(dim=2)
    pooled = summed / mask.sum(dim=2).clamp(min=1).unsqueeze(-1)
    return pooled, (mask.sum(dim=2) > 0).to(mask.dtype)


class OfficialStyleReranker:
    def __init__(self, path, *, dtype: torch.dtype, chunk_size: int | None = 4, max_length: int = 1024,
                 query_max_length: int = 512, pad_decoder_to: int = 8):
        self.tok = AutoTokenizer.from_pretrained(str(path))
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "right"
        self.model = parameters_only(AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=dtype), dtype).eval()
        self.r, self.max_length, self.query_max_length = chunk_size, max_length, query_max_length
        self.pad_decoder_to = pad_decoder_to
        self.yes = self.tok("yes", add_special_tokens=False)["input_ids"][0]
        self.no = self.tok("no", add_special_tokens=False)["input_ids"][0]

    def decoder_text(self, query: str, instruction: str) -> str:
        ids = self.tok(query, add_special_tokens=False, truncation=True, max_length=self.query_max_length)["input_ids"]
        q = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return (f"<bos><start_of_turn>user\n{SYSTEM}\n\n<Instruct>: {instruction}\n<Query>: {q}<end_of_turn>\n"
                "<start_of_turn>model\n\n\n\n")

    @torch.inference_mode()
    def _batch(self, pairs, instruction) -> list[float]:
        enc = self.tok([f"<Document>: {d}" for _, d in pairs], padding=True, truncation=True,
                       max_length=self.max_length, add_special_tokens=False, return_tensors="pt")
        dec = self.tok([self.decoder_text(q, instruction) for q, _ in pairs], padding=True,
                       pad_to_multiple_of=self.pad_decoder_to, add_special_tokens=False, return_tensors="pt")
        if self.r is None:
            out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             decoder_input_ids=dec["input_ids"], decoder_attention_mask=dec["attention_mask"])
        else:
            states = self.model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                              return_dict=True).last_hidden_state
            pooled, pooled_mask = chunk_mean(states, enc["attention_mask"], self.r)
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=pooled), attention_mask=pooled_mask,
                             decoder_input_ids=dec["input_ids"], decoder_attention_mask=dec["attention_mask"])
        last = dec["attention_mask"].sum(dim=1) - 1
        rows = out.logits[torch.arange(len(pairs)), last]
        yes_no = torch.stack((rows[:, self.yes], rows[:, self.no]), dim=-1).float()
        return torch.softmax(yes_no, dim=-1)[:, 0].tolist()

    def predict(self, pairs, *, batch_size: int = 32, instruction: str = INSTRUCTION) -> np.ndarray:
        order = np.argsort([-(len(q) + len(d)) for q, d in pairs], kind="stable")
        scores: list[float] = []
        for start in range(0, len(pairs), batch_size):
            scores += self._batch([pairs[i] for i in order[start:start + batch_size]], instruction)
        out = np.empty(len(pairs), np.float32)
        out[order] = scores
        return out
