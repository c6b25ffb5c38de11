"""Document boundaries in packed rows: per-token document ids and what the mixers derive from them.

A packed row holds several documents back to back. `doc_ids` (B, L) int labels every token with its
document: any labels that are constant over each document's contiguous run of tokens, so that a change
between positions t - 1 and t starts a new document at t (the mamba-ssm kernels call them `seq_idx`).
Per-token ids, rather than cu_seqlens, keep the (B, L) batch shape every PyTorch path works in, pass to the
kernels as they are, and leave the rows independent of one another.

A mixer with document boundaries lets no conv tap, recurrent state, attention score or long-conv tap reach
from one document into the next: each document's outputs are those it would get alone in a row.
"""

from __future__ import annotations

import torch


def segments(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) int64: 0 for each row's first document, one more at every start (a canonical, sorted labelling)."""
    change = torch.zeros_like(doc_ids, dtype=torch.int64)
    change[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
    return change.cumsum(dim=1)


def starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True where a document starts after position 0 (the state before it must be dropped)."""
    out = torch.zeros_like(doc_ids, dtype=torch.bool)
    out[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return out


def positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) int64: each token's position within its document (0 at every start)."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    first = torch.where(starts(doc_ids), index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def pad_segments(seg: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, L) segments extended by `pad` positions of the last document (padded steps change no state)."""
    return torch.cat([seg, seg[:, -1:].expand(-1, pad)], dim=1)


def chunk_labels(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked segments (B, c, T) -> (entering, ending), both (B, c): the document of the state that enters each
    chunk (the previous chunk's last token; the first token for chunk 0, whose initial state continues it) and
    the document of each chunk's last token."""
    ending = seg[..., -1]
    entering = torch.cat([seg[:, :1, 0], ending[:, :-1]], dim=1)
    return entering, ending
