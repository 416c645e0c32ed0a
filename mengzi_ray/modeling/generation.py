"""Caption decoding with the original Oscar semantics (microsoft/Oscar `oscar/modeling/modeling_bert.py`
`BertForImageCaptioning.generate`): greedy and beam search, batched.

Input is the captioning *test* layout: `input_ids` (B, G + Lb) = [CLS] [MASK]… [SEP] [PAD]… (G caption slots)
followed by Lb od-label slots; `attention_mask` (B, N, N) with N = G + Lb + R; `token_type_ids` (B, G + Lb);
`img_feats` (B, R, D). At length t the model sees [tokens_0..t-1, [MASK]] ‖ labels ‖ regions with caption rows and
columns t+1..G-1 removed from the mask, and predicts the next token at the [MASK] slot. Od labels keep the
positions they had in training (from `od_labels_start_posid`).

The key/value cache is exact: labels and regions never attend the caption (the seq2seq mask), and a caption token
attends only to its prefix, so their keys/values are computed once; each step feeds [last token, [MASK]] and
caches the token's keys/values (the [MASK]'s are discarded). Beams re-order the cache with their histories, which
the original's cached beam search does not do. Cached and uncached decoding give the same ids and scores.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mengzi_ray.modeling.oscar import KVCache, OscarModel


class GenerationOutput(NamedTuple):
    sequences: torch.Tensor  # (B, num_keep_best, G) long: [CLS] caption [SEP] [PAD]…
    scores: torch.Tensor  # (B, num_keep_best) float: length-normalised log-prob (greedy: mean token log-prob)


class SpecialIds(NamedTuple):
    bos: int  # [CLS]
    eos: int  # [SEP]
    pad: int  # [PAD]
    mask: int  # [MASK]


class _Decoder:
    """Runs one decoding step for a (batch × beams) set of rows, with or without the cache."""

    def __init__(
        self,
        trunk: OscarModel,
        lm_head: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        img_feats: torch.Tensor,
        max_length: int,
        od_labels_start_posid: int,
        mask_id: int,
        use_cache: bool,
    ):
        self.trunk, self.lm_head, self.G, self.mask_id = trunk, lm_head, max_length, mask_id
        self.labels = input_ids[:, max_length:]
        num_labels = self.labels.shape[1]
        self.full_mask = attention_mask
        self.full_types = token_type_ids
        self.img_feats = img_feats
        device = input_ids.device
        start = max(od_labels_start_posid, max_length)
        self.full_pos = torch.cat(
            [torch.arange(max_length, device=device), torch.arange(start, start + num_labels, device=device)]
        ).expand(input_ids.shape[0], -1)
        caption_blind = not attention_mask[:, max_length:, :max_length].any()
        self.use_cache = use_cache and caption_blind
        self.kv: KVCache | None = None
        self.cache_cols: list[int] = []

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search re-orders rows; everything per row follows, the cache included."""
        self.labels, self.full_mask = self.labels[rows], self.full_mask[rows]
        self.full_types, self.full_pos, self.img_feats = self.full_types[rows], self.full_pos[rows], self.img_feats[rows]
        if self.kv is not None:
            self.kv = [(k[rows], v[rows]) for k, v in self.kv]

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (rows, t) so far, [CLS] first → logits (rows, V) for token t."""
        t = tokens.shape[1]
        masks = tokens.new_full((tokens.shape[0], 1), self.mask_id)
        if self.use_cache and self.kv is not None:
            return self._cached_step(tokens[:, -1:], masks, t)
        text_cols = list(range(t + 1)) + list(range(self.G, self.G + self.labels.shape[1]))
        total = self.full_mask.shape[1]
        region_cols = list(range(total - self.img_feats.shape[1], total))
        cols = torch.tensor(text_cols + region_cols, device=tokens.device)
        out = self.trunk(
            torch.cat([tokens, masks, self.labels], dim=1),
            self.full_mask[:, cols][:, :, cols],
            self.full_types[:, text_cols],
            self.img_feats,
            self.full_pos[:, text_cols],
            return_kv=self.use_cache,
        )
        if self.use_cache:  # keep keys/values of [CLS], labels and regions; drop the [MASK]'s
            keep = torch.tensor([0] + list(range(2, len(cols))), device=tokens.device)
            self.kv = [(k[:, :, keep], v[:, :, keep]) for k, v in out.layer_kv]
            self.cache_cols = cols[keep].tolist()
        return self.lm_head(out.last_hidden_state[:, t])

    def _cached_step(self, last: torch.Tensor, masks: torch.Tensor, t: int) -> torch.Tensor:
        new_cols = [t - 1, t]
        cols = torch.tensor(self.cache_cols + new_cols, device=last.device)
        mask = self.full_mask[:, new_cols][:, :, cols]
        out = self.trunk(
            torch.cat([last, masks], dim=1),
            mask,
            self.full_types[:, new_cols],
            None,
            self.full_pos[:, new_cols],
            past_kv=self.kv,
            return_kv=True,
        )
        self.kv = [
            (torch.cat([k, nk[:, :, :1]], dim=2), torch.cat([v, nv[:, :, :1]], dim=2))
            for (k, v), (nk, nv) in zip(self.kv, out.layer_kv)
        ]
        self.cache_cols.append(t - 1)
        return self.lm_head(out.last_hidden_state[:, 1])


class _Hypotheses:
    """The n best finished hypotheses of one sentence (the original's BeamHypotheses, early_stopping off)."""

    def __init__(self, n: int, max_length: int, length_penalty: float):
        self.n, self.max_length, self.length_penalty = n, max_length - 1, length_penalty  # -1: [CLS] is given
        self.hyps: list[tuple[float, torch.Tensor]] = []
        self.worst = 1e9

    def add(self, tokens: torch.Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / len(tokens) ** self.length_penalty
        if len(self.hyps) < self.n or score > self.worst:
            self.hyps.append((score, tokens))
            if len(self.hyps) > self.n:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.hyps))
                del self.hyps[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float) -> bool:
        if len(self.hyps) < self.n:
            return False
        return self.worst >= best_sum_logprobs / self.max_length**self.length_penalty


def _greedy(
    decoder: _Decoder, batch: int, ids: SpecialIds, device: torch.device, temperature: float | None = None
) -> GenerationOutput:
    """Left-to-right decoding: argmax, or (temperature given) a multinomial draw from softmax(logits / T)."""
    G = decoder.G
    tokens = torch.full((batch, 1), ids.bos, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.long, device=device)
    logprobs, alive = [], []
    while tokens.shape[1] < G:
        logits = decoder.next_logits(tokens).float()
        if temperature is None:
            next_token = logits.argmax(dim=-1)
        else:
            logits = logits / temperature
            next_token = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1)[:, 0]
        logprobs.append(F.log_softmax(logits, dim=-1).gather(1, next_token[:, None]))
        alive.append(unfinished)
        added = next_token * unfinished + ids.pad * (1 - unfinished)
        tokens = torch.cat([tokens, added[:, None]], dim=1)
        unfinished = unfinished * added.ne(ids.eos).long()
        if unfinished.max() == 0:
            break
    if tokens.shape[1] == G:  # rows that ran out of room end with [SEP]
        tokens[:, -1].masked_fill_(unfinished.bool(), ids.eos)
    counted = torch.stack(alive, dim=1).float()
    scores = (torch.cat(logprobs, dim=1) * counted).sum(dim=1) / counted.sum(dim=1)
    if tokens.shape[1] < G:
        tokens = torch.cat([tokens, tokens.new_full((batch, G - tokens.shape[1]), ids.pad)], dim=1)
    return GenerationOutput(tokens[:, None, :], scores[:, None])


def _beam(
    decoder: _Decoder, batch: int, ids: SpecialIds, num_beams: int, length_penalty: float, keep: int, device: torch.device
) -> GenerationOutput:
    G = decoder.G
    tokens = torch.full((batch * num_beams, 1), ids.bos, dtype=torch.long, device=device)
    hyps = [_Hypotheses(keep, G, length_penalty) for _ in range(batch)]
    beam_scores = torch.zeros(batch, num_beams, device=device)
    beam_scores[:, 1:] = -1e9  # step 1 expands beam 0 only
    beam_scores = beam_scores.view(-1)
    done = [False] * batch
    while tokens.shape[1] < G:
        cur_len = tokens.shape[1]
        log_probs = F.log_softmax(decoder.next_logits(tokens).float(), dim=-1)
        vocab = log_probs.shape[-1]
        candidates = (log_probs + beam_scores[:, None]).view(batch, num_beams * vocab)
        top_scores, top_ids = torch.topk(candidates, 2 * num_beams, dim=1, largest=True, sorted=True)
        next_beams: list[tuple[float, int, int]] = []
        for b in range(batch):
            done[b] = done[b] or hyps[b].is_done(top_scores[b].max().item())
            if done[b]:
                next_beams.extend([(0.0, ids.pad, 0)] * num_beams)
                continue
            chosen: list[tuple[float, int, int]] = []
            for idx, score in zip(top_ids[b].tolist(), top_scores[b].tolist()):
                beam, word = divmod(idx, vocab)
                row = b * num_beams + beam
                if word == ids.eos or cur_len + 1 == G:
                    hyps[b].add(tokens[row, :cur_len].clone(), score)
                else:
                    chosen.append((score, word, row))
                if len(chosen) == num_beams:
                    break
            next_beams.extend(chosen if chosen else [(0.0, ids.pad, 0)] * num_beams)
        beam_scores = torch.tensor([s for s, _, _ in next_beams], device=device)
        rows = torch.tensor([r for _, _, r in next_beams], device=device)
        words = torch.tensor([w for _, w, _ in next_beams], device=device)
        tokens = torch.cat([tokens[rows], words[:, None]], dim=1)
        decoder.reorder(rows)
        if all(done):
            break
    sequences = torch.full((batch, keep, G), ids.pad, dtype=torch.long, device=device)
    scores = torch.full((batch, keep), -1e5, device=device)
    for b, h in enumerate(hyps):
        ranked = sorted(h.hyps, key=lambda x: x[0], reverse=True)[:keep]
        for k, (score, hyp) in enumerate(ranked):
            sequences[b, k, : len(hyp)] = hyp
            sequences[b, k, len(hyp)] = ids.eos
            scores[b, k] = score
    return GenerationOutput(sequences, scores)


@torch.no_grad()
def generate(
    trunk: OscarModel,
    lm_head: torch.nn.Module,
    special_ids: SpecialIds,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor,
    img_feats: torch.Tensor,
    *,
    max_length: int = 20,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    num_keep_best: int = 1,
    od_labels_start_posid: int = 40,
    use_cache: bool = True,
) -> GenerationOutput:
    """Decode captions for a batch in the test layout (module docstring). Greedy when num_beams == 1."""
    batch, text_len = input_ids.shape
    if text_len < max_length:
        raise ValueError(f"input_ids has {text_len} text slots, fewer than max_length {max_length}")
    n = text_len + img_feats.shape[1]
    if attention_mask.shape != (batch, n, n):
        raise ValueError(f"attention_mask must be (B, {n}, {n}) in the test layout, got {tuple(attention_mask.shape)}")
    if num_beams < 1 or num_keep_best < 1 or num_keep_best > num_beams:
        raise ValueError(f"need 1 <= num_keep_best ({num_keep_best}) <= num_beams ({num_beams})")
    decoder = _Decoder(
        trunk, lm_head, *_repeat_rows(num_beams, input_ids, attention_mask, token_type_ids, img_feats),
        max_length, od_labels_start_posid, special_ids.mask, use_cache,
    )
    if num_beams == 1:
        return _greedy(decoder, batch, special_ids, input_ids.device)
    return _beam(decoder, batch, special_ids, num_beams, length_penalty, num_keep_best, input_ids.device)


def _repeat_rows(n: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every row repeated n times, the copies of one image adjacent (beams, samples)."""
    if n == 1:
        return list(tensors)
    expand = torch.arange(tensors[0].shape[0], device=tensors[0].device).repeat_interleave(n)
    return [t[expand] for t in tensors]


def sample(
    trunk: OscarModel,
    lm_head: torch.nn.Module,
    special_ids: SpecialIds,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor,
    img_feats: torch.Tensor,
    *,
    max_length: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    od_labels_start_posid: int = 40,
) -> GenerationOutput:
    """`num_samples` multinomial captions per image (SCST, microsoft/Oscar `oscar/run_captioning.py`
    `scst_train_iter`), same layout as `generate`.

    Not under no_grad: `scores` (B * num_samples,) is the mean token log-prob of each sample (EOS included) under
    softmax(logits / temperature), differentiable w.r.t. the model; `sequences` is (B * num_samples, G), the
    samples of one image adjacent. Uses the exact key/value cache, as greedy decoding does."""
    if num_samples < 1 or temperature <= 0:
        raise ValueError(f"need num_samples >= 1 and temperature > 0, got {num_samples}, {temperature}")
    decoder = _Decoder(
        trunk, lm_head, *_repeat_rows(num_samples, input_ids, attention_mask, token_type_ids, img_feats),
        max_length, od_labels_start_posid, special_ids.mask, True,
    )
    out = _greedy(decoder, input_ids.shape[0] * num_samples, special_ids, input_ids.device, temperature)
    return GenerationOutput(out.sequences[:, 0], out.scores[:, 0])
