"""Pairing SR outputs with ground-truth images by file name.

Methods name their outputs differently (``x.png``, ``x_out.png``, ``x_SR.png``, ``x_codsr_s42.png``;
RealSR's ``Canon_001_LR4.png`` against ``Canon_001_HR.png``), so each prediction is matched to a
ground-truth image by the first rule that gives a unique answer:

1. ``exact``: same stem.
2. ``casefold``: same stem ignoring case.
3. ``prefix``: the prediction stem starts with a ground-truth stem followed by a separator
   (``_ - . space``); the longest such ground-truth stem wins (``img_1_2_out`` → ``img_1_2``).
4. ``normalized``: both stems equal after removing trailing role/scale tokens
   (``_hr _gt _lr _lq _sr _out _output _result _restored _pred _x4 _lr4 _4x`` ...).

Anything that does not pair one-to-one (unmatched predictions, ground truths with no prediction,
two candidates for one prediction, two predictions for one ground truth) is reported by
:class:`PairingReport` and raises :class:`PairingError` unless unpaired files are explicitly allowed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from codsr.evaluation.images import list_images

_SEPARATORS = "_-. "
_ROLE_TOKEN = re.compile(
    r"[_\-. ](?:hr|gt|lr|lq|sr|out|output|result|results|restored|pred|x\d+|lr\d+|hr\d+|lrx\d+|\d+x)$"
)
_MAX_LISTED = 10


@dataclass(frozen=True)
class ImagePair:
    """One evaluation item: a prediction and its ground truth (None for no-reference only)."""

    pred: Path
    gt: Path | None
    rule: str  # exact | casefold | prefix | normalized | no-gt


@dataclass
class PairingReport:
    """Outcome of matching a prediction folder against a ground-truth folder."""

    pairs: list[ImagePair] = field(default_factory=list)
    unmatched_pred: list[Path] = field(default_factory=list)
    unmatched_gt: list[Path] = field(default_factory=list)
    ambiguous: list[tuple[Path, list[Path]]] = field(default_factory=list)
    duplicates: list[tuple[Path, list[Path]]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every prediction and every ground truth is paired exactly once."""
        return not (self.unmatched_pred or self.unmatched_gt or self.ambiguous or self.duplicates)

    @property
    def consistent(self) -> bool:
        """True when no file has more than one partner (unpaired files are allowed)."""
        return not (self.ambiguous or self.duplicates)

    def describe(self) -> str:
        """Human-readable list of every problem, one block per kind."""
        lines: list[str] = []

        def names(paths: Sequence[Path]) -> str:
            shown = ", ".join(p.name for p in paths[:_MAX_LISTED])
            more = len(paths) - _MAX_LISTED
            return shown + (f", ... ({more} more)" if more > 0 else "")

        if self.unmatched_pred:
            lines.append(
                f"{len(self.unmatched_pred)} prediction(s) with no ground truth: {names(self.unmatched_pred)}"
            )
        if self.unmatched_gt:
            lines.append(
                f"{len(self.unmatched_gt)} ground truth(s) with no prediction: {names(self.unmatched_gt)}"
            )
        for pred, gts in self.ambiguous:
            lines.append(f"prediction {pred.name} matches several ground truths: {names(gts)}")
        for gt, preds in self.duplicates:
            lines.append(f"ground truth {gt.name} is claimed by several predictions: {names(preds)}")
        return "\n".join(lines) if lines else "all images paired"


class PairingError(ValueError):
    """Prediction and ground-truth folders do not pair one-to-one."""

    def __init__(self, report: PairingReport, pred_dir: Path | None = None, gt_dir: Path | None = None):
        self.report = report
        where = f" ({pred_dir} vs {gt_dir})" if pred_dir is not None else ""
        hint = (
            "\nRename the files so stems match, or pass allow_unpaired=True (CLI: --allow-unpaired) "
            "to evaluate only the matched pairs."
            if report.consistent
            else "\nRemove or rename the conflicting files; ambiguous pairs are never guessed."
        )
        super().__init__(f"cannot pair predictions with ground truths{where}:\n{report.describe()}{hint}")


def _strip_role_tokens(stem: str) -> str:
    key = stem.casefold()
    while True:
        stripped = _ROLE_TOKEN.sub("", key)
        if stripped == key or not stripped:
            return key
        key = stripped


def _candidates(pred_stem: str, gts: Sequence[Path]) -> tuple[str, list[Path]]:
    """The first rule with any candidate, and its candidates (several means ambiguous)."""
    exact = [g for g in gts if g.stem == pred_stem]
    if exact:
        return "exact", exact
    folded = pred_stem.casefold()
    casefold = [g for g in gts if g.stem.casefold() == folded]
    if casefold:
        return "casefold", casefold
    prefix = [
        g
        for g in gts
        if len(folded) > len(g.stem)
        and folded.startswith(g.stem.casefold())
        and folded[len(g.stem)] in _SEPARATORS
    ]
    if prefix:
        longest = max(len(g.stem) for g in prefix)
        return "prefix", [g for g in prefix if len(g.stem) == longest]
    key = _strip_role_tokens(pred_stem)
    normalized = [g for g in gts if _strip_role_tokens(g.stem) == key]
    return "normalized", normalized


def pair_images(preds: Sequence[Path], gts: Sequence[Path] | None) -> PairingReport:
    """Match prediction files to ground-truth files by name (rules in the module docstring).

    With ``gts=None`` every prediction becomes a no-reference item.
    """
    report = PairingReport()
    if gts is None:
        report.pairs = [ImagePair(Path(p), None, "no-gt") for p in preds]
        return report
    gts = [Path(g) for g in gts]
    claimed: dict[Path, list[ImagePair]] = defaultdict(list)
    contested: set[Path] = set()  # candidates of an ambiguous prediction: reported there, not as unmatched
    for pred in map(Path, preds):
        rule, cands = _candidates(pred.stem, gts)
        if not cands:
            report.unmatched_pred.append(pred)
        elif len(cands) > 1:
            report.ambiguous.append((pred, cands))
            contested.update(cands)
        else:
            claimed[cands[0]].append(ImagePair(pred, cands[0], rule))
    for gt in gts:
        pairs = claimed.get(gt, [])
        if len(pairs) == 1:
            report.pairs.append(pairs[0])
        elif len(pairs) > 1:
            report.duplicates.append((gt, [p.pred for p in pairs]))
        elif gt not in contested:
            report.unmatched_gt.append(gt)
    report.pairs.sort(key=lambda p: p.pred.name)
    return report


def pair_folders(
    pred_dir: str | Path, gt_dir: str | Path | None = None, *, allow_unpaired: bool = False
) -> PairingReport:
    """List both folders and pair them; raises :class:`PairingError` on any mismatch.

    ``allow_unpaired=True`` tolerates predictions or ground truths without a partner (they are
    left out and listed in the report); conflicts (ambiguous or duplicate pairs) always raise.
    """
    pred_dir = Path(pred_dir)
    preds = list_images(pred_dir)
    if not preds:
        raise FileNotFoundError(f"no images in prediction folder {pred_dir}")
    gts = None
    if gt_dir is not None:
        gts = list_images(gt_dir)
        if not gts:
            raise FileNotFoundError(f"no images in ground-truth folder {gt_dir}")
    report = pair_images(preds, gts)
    if not report.consistent or (not allow_unpaired and not report.complete) or not report.pairs:
        raise PairingError(report, pred_dir, None if gt_dir is None else Path(gt_dir))
    return report
