"""A deliberately plain re-implementation of the official KaLM-Reranker-V1 inference, for parity tests.

Joint model (AutoModelForSeq2SeqLM, full checkpoint incl. vision tower), the whole batch encoded together, reference
pooling written out here independently of kalm_batch.pooling, full-vocabulary logits at every decoder position.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.modeling_outputs import BaseModelOutput

SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')
INSTRUCTION = "Given a query, retrieve documents that answer the query."


def reference_pool(h, mask, r):
    if r is None:
        return h, mask
    b, n, d = h.shape
    pad = (r - n % r) % r
    if pad:
        h = torch.cat([h, h.new_zeros(b, pad, d)], dim=1)
        mask = torch.cat([mask, mask.new_zeros(b, pad)], dim=1)
    hm = h * mask.unsqueeze(-1).to(h.dtype)
    hm = hm.reshape(b, -1, r, d).sum(2)
    cnt = mask.reshape(b, -1, r).sum(2).to(h.dtype)
    pooled = hm / torch.clamp(cnt, min=1).unsqueeze(-1)
    return pooled, (cnt > 0).long()


class ReferenceReranker:
    def __init__(self, path, dtype=torch.float32, max_length=1024, query_max_length=512, chunk_size=4):
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "right"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype).eval()
        self.max_length, self.query_max_length, self.r = max_length, query_max_length, chunk_size
        self.yes = self.tok("yes", add_special_tokens=False).input_ids[0]
        self.no = self.tok("no", add_special_tokens=False).input_ids[0]

    def template(self, query, instruction=INSTRUCTION):
        ids = self.tok(query, add_special_tokens=False).input_ids[: self.query_max_length]
        q = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return ("<bos><start_of_turn>user\n" + SYSTEM + "\n\n<Instruct>: " + instruction + "\n<Query>: " + q
                + "<end_of_turn>\n<start_of_turn>model\n\n\n\n")

    @torch.no_grad()
    def predict(self, pairs, instruction=INSTRUCTION, return_margin=False):
        docs = ["<Document>: " + d for _, d in pairs]
        enc = self.tok(docs, add_special_tokens=False, truncation=True, max_length=self.max_length,
                       padding=True, return_tensors="pt")
        h = self.model.get_encoder()(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        mem, mem_mask = reference_pool(h, enc.attention_mask, self.r)
        dec = self.tok([self.template(q, instruction) for q, _ in pairs], add_special_tokens=False, padding=True,
                       pad_to_multiple_of=8, return_tensors="pt")
        logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=mem), attention_mask=mem_mask,
                            decoder_input_ids=dec.input_ids, decoder_attention_mask=dec.attention_mask).logits
        last = dec.attention_mask.sum(1) - 1
        rows = logits[torch.arange(len(pairs)), last]
        yn = torch.stack([rows[:, self.yes], rows[:, self.no]], dim=1).float()
        p = torch.softmax(yn, dim=1)[:, 0]
        return (p, yn[:, 0] - yn[:, 1]) if return_margin else p
