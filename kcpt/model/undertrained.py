"""Undertrained tokens after vocabulary expansion: rows that training has barely moved, or whose norms are
outliers.

After :func:`kcpt.model.audit.expand_tokenizer_and_model` the new rows start at their folded init. A token the
CPT data rarely or never contains keeps that row (and, untied, its output row): the model "knows" the token only
as the average of its pieces, and sampling it is unreliable. Compared with the expanded-but-untrained model
(``init``), each row's movement ``‖E_ckpt[i] − E_init[i]‖`` is measured and set against a reference: the
``ref_quantile`` (0.99) quantile of the OLD rows' movements — rows of tokens the data uses move by roughly the
learning rate every step, unused rows only by weight decay, so the top of the old rows stands for "trained"
whatever share of the vocabulary the corpus touches. A new token that moved less than ``min_movement`` × the
reference is *undertrained* (new or rare in the data). Without ``init``, a token whose embedding norm is a
robust outlier (|z| of the log-norm, median/MAD, above ``z_max``) among all rows is flagged (the classic signature
of never-updated or blown-up rows); with ``init`` that rule is off, since folded rows (a mean of rows) are short by
design and every new token would be an outlier. Padding rows past the tokenizer's last token are not checked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kcpt.errors import InputError


@dataclass
class TokenFlag:
    token_id: int
    token: str
    """The token decoded (as text)."""
    movement_ratio: float | None
    """Its row's movement over the reference movement (None without ``init``)."""
    norm_z: float
    """Robust z-score of its input-embedding log-norm among all rows."""
    reasons: list[str]


@dataclass
class UndertrainedReport:
    checked: int
    """New tokens checked (ids ≥ ``first_new_id``)."""
    reference_movement: float | None
    """The ``ref_quantile`` quantile of the old rows' movements (None without ``init``)."""
    undertrained: list[TokenFlag] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        head = (f"{len(self.undertrained)} of {self.checked} new tokens look undertrained"
                + (f" (reference row movement {self.reference_movement:.3g})" if self.reference_movement else ""))
        rows = [f"  {f.token_id:>7}  {f.token!r:<24} movement/reference {_f(f.movement_ratio)}  norm z {f.norm_z:+.1f}"
                f"  {', '.join(f.reasons)}" for f in self.undertrained[:40]]
        return "\n".join([head, *rows, *(["  …"] if len(self.undertrained) > 40 else [])])


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _rows(model: Any) -> list[torch.Tensor]:
    emb_in = model.get_input_embeddings().weight.detach().float().cpu()
    out = model.get_output_embeddings()
    if out is None or out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        return [emb_in]
    return [emb_in, out.weight.detach().float().cpu()]


def find_undertrained(model: Any, tokenizer: Any, *, first_new_id: int, init: Any | None = None,
                      min_movement: float = 0.1, ref_quantile: float = 0.99, z_max: float = 4.0
                      ) -> UndertrainedReport:
    """Flag new tokens (ids ``first_new_id`` … ) of ``model`` that look undertrained (see the module docstring).

    ``init``: the same model before training (the expanded model with folded init), for the movement rule;
    ``min_movement``: a new row moving less than this fraction of the ``ref_quantile`` quantile of the OLD rows'
    movements (ids below ``first_new_id``) is undertrained; ``z_max``: the norm-outlier threshold. Both embedding
    matrices count when untied (the smaller movement)."""
    rows = _rows(model)
    vocab = rows[0].shape[0] if tokenizer is None else min(rows[0].shape[0], len(tokenizer))  # not padding rows
    if not 0 < first_new_id <= vocab:
        raise ValueError(f"first_new_id {first_new_id} outside the vocabulary (1..{vocab})")
    logn = rows[0].norm(dim=1).clamp_min(1e-12).log()
    med = logn.median()
    mad = (logn - med).abs().median().clamp_min(1e-12) * 1.4826
    z = (logn - med) / mad
    moved: torch.Tensor | None = None
    reference = None
    if init is not None:
        init_rows = _rows(init)
        if [r.shape for r in init_rows] != [r.shape for r in rows]:
            raise InputError(f"--init has embedding shapes {[tuple(r.shape) for r in init_rows]} and the checkpoint "
                             f"{[tuple(r.shape) for r in rows]}: give as --init the expanded model directory this "
                             "checkpoint's run started from (written by --expand --model --out)")
        moves = [(a - b).norm(dim=1) for a, b in zip(rows, init_rows, strict=True)]
        moved = torch.stack(moves).min(dim=0).values if len(moves) > 1 else moves[0]
        reference = float(torch.quantile(moved[:first_new_id], ref_quantile))
    flags = []
    for i in range(first_new_id, vocab):
        reasons = []
        ratio = None
        if moved is not None and reference is not None and reference > 0:
            ratio = float(moved[i]) / reference
            if ratio < min_movement:
                reasons.append("barely moved from its init")
        zi = float(z[i])
        if init is None and math.isfinite(zi) and abs(zi) > z_max:  # with init, folded rows are short by design
            reasons.append("embedding norm outlier")
        if reasons:
            flags.append(TokenFlag(i, tokenizer.decode([i]), ratio, zi, reasons))
    flags.sort(key=lambda f: (f.movement_ratio if f.movement_ratio is not None else math.inf, -abs(f.norm_z)))
    return UndertrainedReport(checked=vocab - first_new_id, reference_movement=reference, undertrained=flags)
