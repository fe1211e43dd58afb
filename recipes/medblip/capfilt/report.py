"""The CapFilt report: ITM score histograms (original vs synthetic) as a PNG and in TensorBoard, kept/removed counts
per modality, and a Markdown page of example pairs with thumbnails, all under OUT/report/ and OUT/tb/."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from recipes.common.image_text import IMAGE_KEYS, open_image
from recipes.medblip.capfilt.writing import read_samples

THUMB_SIDE = 128
COLOURS = {"original": (31, 119, 180), "synthetic": (255, 127, 14)}  # the two series, colour-blind safe pair


def _bars(hist: dict[str, Any]) -> tuple[list[float], list[float]]:
    counts = hist["histogram"]["counts"]
    total = max(1, sum(counts))
    return hist["histogram"]["edges"], [c / total for c in counts]


def histogram_png(scores: dict[str, dict], threshold: float, size: tuple[int, int] = (720, 420)) -> bytes:
    """PNG of the score histograms (share of each kind's captions per bin), the threshold as a red line."""
    w, h = size
    left, right, top, bottom = 60, 20, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    series = {k: _bars(v) for k, v in scores.items() if v["count"]}
    ymax = max([max(f) for _, f in series.values()] + [0.05])
    ymax = min(1.0, np.ceil(ymax * 10) / 10)
    px = lambda x: left + x * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - y / ymax * (h - top - bottom)  # noqa: E731
    for i in range(6):  # y grid and ticks
        y = ymax * i / 5
        d.line([(left, py(y)), (w - right, py(y))], fill=(225, 225, 225))
        d.text((8, py(y) - 6), f"{y:.2f}", fill="black", font=font)
    for x in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line([(px(x), h - bottom), (px(x), h - bottom + 5)], fill="black")
        d.text((px(x) - 10, h - bottom + 8), f"{x:.2f}", fill="black", font=font)
    names = list(series)
    for n, name in enumerate(names):
        edges, shares = series[name]
        for i, share in enumerate(shares):  # side by side within each bin
            x0 = px(edges[i]) + 1 + n * (px(edges[i + 1]) - px(edges[i]) - 2) / len(names)
            x1 = x0 + (px(edges[i + 1]) - px(edges[i]) - 2) / len(names)
            if share > 0:
                d.rectangle([x0, py(share), x1, h - bottom], fill=COLOURS.get(name, (90, 90, 90)))
    d.line([(left, h - bottom), (w - right, h - bottom)], fill="black")
    d.line([(left, top), (left, h - bottom)], fill="black")
    tx = px(threshold)
    for y in range(top, h - bottom, 8):  # dashed threshold line
        d.line([(tx, y), (tx, min(y + 4, h - bottom))], fill=(214, 39, 40), width=2)
    d.text((tx + 4, top), f"threshold {threshold:g}", fill=(214, 39, 40), font=font)
    d.text((left, 12), "ITM match probability (share of each kind's captions per bin)", fill="black", font=font)
    d.text((w // 2 - 60, h - 20), "ITM match probability", fill="black", font=font)
    for n, name in enumerate(names):
        x = w - right - 200
        y = top + 4 + 16 * n
        d.rectangle([x, y, x + 12, y + 10], fill=COLOURS.get(name, (90, 90, 90)))
        d.text((x + 18, y - 1), f"{name} (n={scores[name]['count']})", fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def pick_examples(decisions: list[dict], n: int) -> list[dict]:
    """n images spread evenly over the range of original scores (lowest to highest, ties by key): both sides of
    the threshold and the boundary appear whenever they exist."""
    scored = sorted((d for d in decisions if d["original"]["score"] is not None),
                    key=lambda d: (d["original"]["score"], d["shard"], d["key"]))
    if n <= 0 or not scored:
        return []
    if len(scored) <= n:
        return scored
    return [scored[round(i * (len(scored) - 1) / (n - 1))] for i in range(n)] if n > 1 else [scored[0]]


def write_thumbnails(examples: list[dict], urls: list[str], folder: Path) -> dict[tuple[str, str], str]:
    """PNG thumbnails (longer side THUMB_SIDE) of the example images -> {(shard, key): path relative to the report}."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, set[str]] = {}
    for e in examples:
        wanted.setdefault(e["shard"], set()).add(e["key"])
    by_name = {Path(u).name: u for u in urls}
    paths = {}
    for shard, keys in wanted.items():
        for sample in read_samples(by_name[shard]):
            key = str(sample["__key__"])
            if key not in keys:
                continue
            ext = next(k for k in IMAGE_KEYS if sample.get(k) is not None)
            im = open_image(sample[ext])
            im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.BICUBIC)
            name = f"{Path(shard).stem}__{key}.png"
            im.save(folder / name, format="PNG")
            paths[(shard, key)] = f"{folder.name}/{name}"
    return paths


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ") if text not in (None, "") else "-"


def _score(s: Optional[float]) -> str:
    return "-" if s is None else f"{s:.3f}"


def markdown(manifest: dict, examples: list[dict], thumbs: dict[tuple[str, str], str]) -> str:
    """The report page: summary, histogram, counts by kind and modality, example pairs."""
    opts, t, c = manifest["options"], manifest["totals"], manifest["counts"]
    models = manifest["models"]
    who = (f"one model for both: `{models['captioner']['spec']}`" if models["one_model"] else
           f"captioner `{models['captioner']['spec']}`, filter `{models['filter']['spec']}`")
    s = opts["sampling"]
    lines = ["# CapFilt report", "",
             f"{t['images']} images -> {t['samples']} image-caption pairs in {t['shards']} shards "
             f"({t['images_dropped']} images lost every caption). {who}. Nucleus sampling top_p {s['top_p']}, "
             f"k {s['k']}, length {s['min_length']}-{s['max_length']} tokens, repetition penalty "
             f"{s['repetition_penalty']}, seed {opts['seed']}; kept when ITM match probability >= "
             f"{opts['threshold']}; {opts['precision']}.", "",
             "![ITM score histogram](itm_scores.png)", "",
             "| captions | count | mean | 10% | 50% | 90% | kept | removed | duplicate | empty |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("original", "synthetic"):
        sc, n = manifest["scores"][kind], c[kind]
        dec = sc.get("deciles", [None] * 9)
        lines.append(f"| {kind} | {sc['count']} | {_score(sc.get('mean'))} | {_score(dec[0])} | {_score(dec[4])} | "
                     f"{_score(dec[8])} | {n['kept']} | {n['removed']} | {n.get('duplicate', 0)} | {n['empty']} |")
    lines += ["", "## Kept and removed per modality", "",
              "| modality | images | original kept | original removed | synthetic kept | synthetic removed |",
              "|---|---|---|---|---|---|"]
    for name, m in manifest["modalities"].items():
        lines.append(f"| {name} | {m['images']} | {m['original_kept']} | {m['original_removed']} | "
                     f"{m['synthetic_kept']} | {m['synthetic_removed']} |")
    lines += ["", "## Example pairs (spread over the range of original scores)", "",
              "| image | original caption | score | decision | synthetic caption | score | decision |",
              "|---|---|---|---|---|---|---|"]
    for e in examples:
        path = thumbs.get((e["shard"], e["key"]))
        image = f"![{e['key']}]({path})<br>`{path}`" if path else _cell(e["key"])
        syn = e["synthetic"]
        lines.append(f"| {image} | {_cell(e['original']['caption'])} | {_score(e['original']['score'])} | "
                     f"{e['original']['decision']} | {'<br>'.join(_cell(x['caption']) for x in syn)} | "
                     f"{'<br>'.join(_score(x['score']) for x in syn)} | {'<br>'.join(x['decision'] for x in syn)} |")
    return "\n".join(lines) + "\n"


def write_tensorboard(folder: Path, manifest: dict, png: bytes, page: str) -> None:
    """Histograms of the scores (capfilt/itm_original, capfilt/itm_synthetic), counts, the PNG and the page."""
    from torch.utils.tensorboard import SummaryWriter

    decisions = manifest["decisions"]
    writer = SummaryWriter(str(folder))
    try:
        bins = np.linspace(0.0, 1.0, 21)
        orig = np.array([d["original"]["score"] for d in decisions if d["original"]["score"] is not None])
        syn = np.array([s["score"] for d in decisions for s in d["synthetic"] if s["score"] is not None])
        for tag, values in (("capfilt/itm_original", orig), ("capfilt/itm_synthetic", syn)):
            if values.size:
                writer.add_histogram(tag, values, global_step=0, bins=bins)
        for kind, counts in manifest["counts"].items():
            for decision, n in counts.items():
                writer.add_scalar(f"capfilt/{kind}_{decision}", n, 0)
        writer.add_image("capfilt/itm_scores", np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), 0,
                         dataformats="HWC")
        writer.add_text("capfilt/report", page, 0)
    finally:
        writer.close()


def write_report(out: Path, manifest: dict, urls: list[str], *, examples: int = 12,
                 log: Callable[[str], None] = print) -> Path:
    """OUT/report/{index.md, itm_scores.png, thumbs/} and OUT/tb/; returns the page's path."""
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    png = histogram_png(manifest["scores"], manifest["options"]["threshold"])
    (folder / "itm_scores.png").write_bytes(png)
    chosen = pick_examples(manifest["decisions"], examples)
    thumbs = write_thumbnails(chosen, urls, folder / "thumbs")
    page = markdown(manifest, chosen, thumbs)
    (folder / "index.md").write_text(page, encoding="utf-8")
    write_tensorboard(out / "tb", manifest, png, page)
    log(f"capfilt: report {folder / 'index.md'} (histogram {folder / 'itm_scores.png'}); "
        f"TensorBoard: tensorboard --logdir {out / 'tb'}")
    return folder / "index.md"
