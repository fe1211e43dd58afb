"""Imaging modalities: ROCOv2's modality concepts (UMLS CUIs), the caption keywords that stand in for a missing
concept, and the cells of concepts that source tables hold."""
from __future__ import annotations

import re
from typing import Any, Iterable, Optional

from corpora.shard_writer import PrepareError

# ROCOv2's manually curated modality concepts (UMLS CUIs). Every ROCOv2 image carries exactly one of them;
# the same six are the modality concepts of the ImageCLEFmedical 2023 concept-detection evaluation.
MODALITY_CUIS: dict[str, tuple[str, ...]] = {
    "CT": ("C0040405",),  # X-Ray Computed Tomography
    "MRI": ("C0024485",),  # Magnetic Resonance Imaging
    "X-ray": ("C1306645",),  # Plain x-ray (projection radiography)
    "ultrasound": ("C0041618",),  # Ultrasonography
    "angiography": ("C0002978",),  # Angiogram
    "PET": ("C0032743",),  # Positron-Emission Tomography
}
MODALITY_ALIASES = {
    "ct": "CT", "mri": "MRI", "mr": "MRI", "x-ray": "X-ray", "xray": "X-ray", "xr": "X-ray", "cr": "X-ray",
    "radiograph": "X-ray", "radiography": "X-ray", "ultrasound": "ultrasound", "us": "ultrasound",
    "ultrasonography": "ultrasound", "angiography": "angiography", "angio": "angiography",
    "angiogram": "angiography", "pet": "PET",
}
CUI_TO_MODALITY = {cui: name for name, cuis in MODALITY_CUIS.items() for cui in cuis}
# For samples whose concepts name no modality (ROCO v1's cuis.txt, extracted from the captions, has one of the six
# for 2,315 of its 8,180 validation rows and never MRI; tables may have no concepts at all): the modality whose
# keyword comes first in the caption. Whole words, case-insensitive, except MR and US (not "Mr." or "us").
CAPTION_KEYWORDS: dict[str, tuple[str, ...]] = {
    "CT": (r"ct", r"cta", r"hrct", r"mdct", r"cbct", r"computed tomograph\w*", r"computeri[sz]ed tomograph\w*",
           r"cat scan"),
    "MRI": (r"mri", r"(?-i:MR)", r"mra", r"mrcp", r"fmri", r"magnetic resonance", r"t1", r"t2", r"t1w", r"t2w",
            r"t[12][- ]weighted", r"flair", r"dwi", r"diffusion[- ]weighted"),
    "X-ray": (r"x-?rays?", r"x ray", r"radiograph\w*", r"cxr", r"plain films?", r"roentgenogra\w*"),
    "ultrasound": (r"ultrasound\w*", r"ultrasonogra\w*", r"sonogra\w*", r"(?-i:US)", r"echocardiogra\w*",
                   r"doppler"),
    "angiography": (r"angiogra\w*", r"arteriogra\w*", r"venogra\w*", r"dsa"),
    "PET": (r"pet", r"positron emission", r"fdg"),
}
_KEYWORD_RES = {name: re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)
                for name, words in CAPTION_KEYWORDS.items()}
_CUI_RE = re.compile(r"^C\d{7}$")
# What the Hugging Face copy of ROCOv2 (and pandas-written tables) put where an image has no manual concept: the
# string 'nan' (about 1% of its rows carry cui ['nan']). Not a concept: such an image is judged by its caption.
NO_CONCEPT = frozenset({"NAN", "NONE", "NULL", "NA", "N/A", ""})


def resolve_modalities(names: Iterable[str]) -> dict[str, str]:
    """Modality names / raw CUIs -> {CUI: modality name}; unknown names fail listing the known ones."""
    selected: dict[str, str] = {}
    for raw in names:
        for item in str(raw).split(","):
            item = item.strip()
            if not item:
                continue
            if item.lower() in ("all", "radiology"):
                selected.update(CUI_TO_MODALITY)
            elif _CUI_RE.match(item.upper()):
                selected[item.upper()] = CUI_TO_MODALITY.get(item.upper(), item.upper())
            elif item.lower() in MODALITY_ALIASES:
                name = MODALITY_ALIASES[item.lower()]
                selected.update({c: name for c in MODALITY_CUIS[name]})
            else:
                known = ", ".join(MODALITY_CUIS)
                raise PrepareError(f"--modality {item!r}: unknown modality (known: {known}, all, or a UMLS CUI "
                                   "like C0040405)")
    return selected


def modality_of(cuis: Iterable[str]) -> Optional[str]:
    """The first modality concept among an image's CUIs (ROCOv2 has one per image), or None."""
    for c in cuis:
        if c in CUI_TO_MODALITY:
            return CUI_TO_MODALITY[c]
    return None


def caption_modality(caption: str) -> Optional[str]:
    """The modality whose CAPTION_KEYWORDS word comes first in the caption, or None."""
    hits = [(m.start(), name) for name, rx in _KEYWORD_RES.items() if (m := rx.search(caption))]
    return min(hits)[1] if hits else None


def decide_modality(cuis: Iterable[str], caption: str) -> tuple[Optional[str], Optional[str]]:
    """(modality, source): the sample's modality concept (source "cui"), else its caption's first modality
    keyword ("caption"), else (None, None)."""
    name = modality_of(cuis)
    if name:
        return name, "cui"
    name = caption_modality(caption)
    return (name, "caption") if name else (None, None)


def split_cuis(text: Any) -> tuple[str, ...]:
    """A cell of concepts (a list, or text with ; , or spaces) -> upper-case CUIs; 'nan' placeholders dropped."""
    if text is None:
        return ()
    if isinstance(text, float) and text != text:  # a float NaN (pandas' empty cell)
        return ()
    if isinstance(text, (list, tuple)):
        cuis = (str(c).strip().upper() for c in text if c is not None)
    else:
        cuis = (c.strip().upper() for c in re.split(r"[;,\s]+", str(text)))
    return tuple(c for c in cuis if c not in NO_CONCEPT)


def is_placeholder(text: Any) -> bool:
    """True for a concept cell that holds only 'nan'-like placeholders (the image has no manual concept)."""
    if text is None:
        return False
    if isinstance(text, float):
        return text != text
    items = [str(c).strip() for c in text] if isinstance(text, (list, tuple)) else re.split(r"[;,\s]+", str(text))
    return any(c.strip() for c in items) and not split_cuis(text)
