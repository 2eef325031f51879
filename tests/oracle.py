"""Independent float64 oracles, written differently from facekernels.reference on purpose.

* Heads: each head's published formula written out directly (acos / cos / the insightface constants),
  row by row, with torch autograd through acos for the exact margin gradient, instead of the reference's
  (m1, m2, m3, fallback, negatives) parametrisation and hand-written derivatives.
* Triplet: Python loops over every (a, p, n), distances from explicit differences.
"""

from __future__ import annotations

import math

import kit
import torch
import torch.nn.functional as F


def _arc(c, m):
    return torch.cos(torch.acos(c) + m)


def head_loss(x, w, y, case, *, t=0.0, margin_grad="exact", reduction="mean", ignore_index=-100):
    """Loss of ``case`` (a name of kit.ORACLE_CASES) in float64 with autograd; returns (loss, t used).

    For "curricular", ``t`` is the value before this step, and the returned t is the updated one.
    """
    kw = kit.CASES[case].margins
    s = kw["s"]
    x64, w64 = x.double(), w.double()
    x_hat = x64 / x64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w_hat = w64 / w64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    valid = [int(label) != ignore_index for label in y]
    cos_rows = []
    for i in range(x.shape[0]):
        raw = w_hat @ x_hat[i]
        # clamp whose gradient vanishes at +-1 (spec); away from +-1 it is the identity
        cos_rows.append(torch.where((raw > -1) & (raw < 1), raw, raw.detach().clamp(-1, 1)))
    if case == "curricular":
        targets = [float(cos_rows[i][int(y[i])].detach()) for i in range(len(y)) if valid[i]]
        if targets:
            t = kw["momentum"] * (sum(targets) / len(targets)) + (1 - kw["momentum"]) * t
            t = float(torch.tensor(t, dtype=torch.float32))  # the buffer is float32
    losses = []
    for i in range(x.shape[0]):
        if not valid[i]:
            losses.append(torch.zeros((), dtype=torch.float64))
            continue
        cos = cos_rows[i]
        yi = int(y[i])
        c = cos[yi]
        tau = None
        if case == "norm_softmax":
            phi = c
        elif case == "cosface":
            phi = c - kw["m"]
        elif case in ("arcface", "curricular") or (case == "combined"):
            m = kw.get("m", kw.get("m2"))
            # insightface: th = cos(pi - m), mm = sin(pi - m) * m
            phi = _arc(c, m) if c > math.cos(math.pi - m) else c - math.sin(math.pi - m) * m
            tau = _arc(c, m)
        elif case == "arcface_easy":
            phi = _arc(c, kw["m"]) if c > 0 else c
        elif case == "combined_general":
            phi = torch.cos(kw["m1"] * torch.acos(c) + kw["m2"]) - kw["m3"]
        elif case == "mv_am":
            phi = c - kw["m"] if c > kw["m"] else c
            tau = c - kw["m"]
        elif case == "mv_arc":
            phi = _arc(c, kw["m"]) if c > 0 else c
            tau = _arc(c, kw["m"])
        if margin_grad == "straight_through":
            phi = c + (phi - c).detach()
        logits = []
        for j in range(cos.shape[0]):
            if j == yi:
                logits.append(s * phi)
            elif case in ("mv_am", "mv_arc") and cos[j] > tau:
                logits.append(s * ((kw["t"] + 1) * cos[j] + kw["t"]))
            elif case == "curricular" and cos[j] > tau:
                logits.append(s * cos[j] * (t + cos[j]))
            else:
                logits.append(s * cos[j])
        z = torch.stack(logits)
        losses.append(torch.logsumexp(z, 0) - z[yi])
    rows = torch.stack(losses) if losses else torch.zeros(0, dtype=torch.float64)
    if reduction == "none":
        return rows, t
    if reduction == "sum":
        return rows.sum(), t
    return rows.sum() / max(sum(valid), 1), t


# ---------------------------------------------------------------------------------------------- triplet


def _distance(e, a, b, distance):
    if a == b:
        return torch.zeros((), dtype=torch.float64)
    if distance == "cosine":
        ua = e[a] / e[a].norm().clamp_min(1e-12)
        ub = e[b] / e[b].norm().clamp_min(1e-12)
        return F.relu(1 - (ua * ub).sum())
    sq = ((e[a] - e[b]) ** 2).sum()
    if distance == "squared_euclidean":
        return sq
    return sq.sqrt() if sq > 0 else sq * 0


def triplet_loss(e, y, *, margin=0.2, mining="semihard", distance="squared_euclidean", normalize=True,
                 soft=False, reduction="mean"):  # fmt: skip
    """Brute force over every (a, p, n); returns loss or (terms, triplets)."""
    e = e.double()
    if normalize:
        e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = len(y)
    y = [int(v) for v in y]
    d = [[_distance(e, a, b, distance) for b in range(n)] for a in range(n)]
    dv = [[float(d[a][b].detach()) for b in range(n)] for a in range(n)]
    triplets = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and y[p] == y[a]]
        neg = [q for q in range(n) if y[q] != y[a]]
        if not pos or not neg:
            continue
        if mining == "all":
            triplets += [(a, p, q) for p in pos for q in neg]
        elif mining == "hard":
            p = max(pos, key=lambda k: (dv[a][k], -k))  # largest distance, lowest index on ties
            q = min(neg, key=lambda k: (dv[a][k], k))
            triplets.append((a, p, q))
        else:
            for p in pos:
                farther = [q for q in neg if dv[a][q] > dv[a][p]]
                if farther:
                    q = min(farther, key=lambda k: (dv[a][k], k))
                else:
                    q = max(neg, key=lambda k: (dv[a][k], -k))
                triplets.append((a, p, q))
    terms = []
    for a, p, q in triplets:
        gap = d[a][p] - d[a][q]
        terms.append(F.softplus(gap) if soft else F.relu(gap + margin))
    terms = torch.stack(terms) if terms else torch.zeros(0, dtype=torch.float64)
    if reduction == "none":
        return terms, torch.tensor(triplets, dtype=torch.long).reshape(-1, 3)
    total = terms.sum() if len(terms) else (e.sum() * 0)
    if reduction == "sum":
        return total
    if reduction == "mean_nonzero":
        return total / max(int((terms > 0).sum()), 1)
    return total / max(len(terms), 1)
