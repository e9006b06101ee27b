"""The shapes each fused op sees inside the CrossViT variants, derived from ``MODEL_ARGS``.

Branch 0 cuts ``img_size`` into 12-pixel patches, branch 1 cuts ``img_size * img_scale[1]`` into
16-pixel ones (as ``crossvit_fast.model.CrossViT`` computes them). Inside one multi-scale block:

- ``add_layer_norm`` runs on each branch's own tokens: ``[B, N_i + 1, C_i]``;
- ``cls_projection`` maps one token per sample from branch i's width to the other's and back;
- the cross-attention of branch i has branch i's projected CLS token query the OTHER branch's
  patches, so it runs at the other branch's width, heads and patch count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from crossvit_fast.variants import MODEL_ARGS

OPS = ("cross_attention", "cls_projection", "add_layer_norm")


@dataclass(frozen=True)
class Branch:
    """One branch of a variant: width C, heads H and patch tokens N (the CLS token not counted)."""
    width: int
    heads: int
    patches: int


@dataclass(frozen=True)
class Case:
    """One op at one shape, batch size aside.

    ``patches`` is N (tokens besides the CLS token) for the cross-attention and the LayerNorm, 0 for
    the CLS projection; ``heads`` is 0 where the op has none.
    """
    op: str
    c_in: int
    c_out: int
    heads: int
    patches: int

    def shape(self, batch: int) -> Dict[str, int]:
        """The named dimensions of this case at ``batch``, for result rows."""
        if self.op == "cross_attention":
            return dict(B=batch, N=self.patches, C=self.c_in, H=self.heads)
        if self.op == "cls_projection":
            return dict(B=batch, C_in=self.c_in, C_out=self.c_out)
        return dict(B=batch, N=self.patches, C=self.c_in)

    def label(self) -> str:
        """A short human form: ``N=196 C=256 H=4``."""
        return " ".join(f"{k}={v}" for k, v in self.shape(0).items() if k != "B")


def branches(name: str) -> Tuple[Branch, Branch]:
    """The two branches of variant ``name``, at its own image size."""
    args = MODEL_ARGS[name]
    result = []
    for b in (0, 1):
        side = int(args["img_size"] * args["img_scale"][b]) // args["patch_size"][b]
        result.append(Branch(args["embed_dim"][b], args["num_heads"][b], side * side))
    return result[0], result[1]


def _variant_cases(pair: Tuple[Branch, Branch], patch_counts: Sequence[Optional[int]]) -> List[Case]:
    """Every op shape of one variant; a ``None`` patch count means the variant's own N."""
    cases = []
    for own, other in (pair, pair[::-1]):
        cases += [Case("add_layer_norm", own.width, own.width, 0, n or own.patches) for n in patch_counts]
        cases += [Case("cross_attention", other.width, other.width, other.heads, n or other.patches)
                  for n in patch_counts]
        cases.append(Case("cls_projection", own.width, other.width, 0, 0))  # projs[i]; the loop's
        # other turn adds the reverse direction (revert_projs[i])
    return cases


def op_cases(names: Iterable[str], patch_counts: Sequence[Optional[int]] = (None,)
             ) -> Dict[Case, List[str]]:
    """Each distinct op shape across variants ``names`` → the variants using it.

    ``patch_counts`` sweeps the token count: ``None`` stands for each variant's own N, an integer
    replaces it. Cases come grouped by op (in ``OPS`` order), then by width and token count.
    """
    found: Dict[Case, List[str]] = {}
    for name in names:
        for case in _variant_cases(branches(name), patch_counts):
            users = found.setdefault(case, [])
            if name not in users:
                users.append(name)
    order = sorted(found, key=lambda c: (OPS.index(c.op), c.c_in, c.c_out, c.heads, c.patches))
    return {case: found[case] for case in order}
