"""One question about one image (recipes.common.ask, launch/ask.py, the web page): the top-ranked answer is
launch/evaluate.py's prediction for the same question, for a tiny trained MedBLIP and a tiny trained BLIP-2 VQA run;
the web page answers what the Python call answers; bad input ends in one line (CLI) or a 4xx with a message (page)."""
from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
import uuid
import warnings
from pathlib import Path

import pytest
from PIL import Image

from corpora.phantoms import PhantomSpec, write_demo_data
from tests.conftest import ROOT, load_launch, run_entry
from tests.test_vqa_end_to_end import tiny_overrides

MEDBLIP = str(ROOT / "recipes" / "medblip" / "vqa.yaml")
BLIP2 = str(ROOT / "recipes" / "blip2" / "demo" / "vqa.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Phantoms (seeded): 8 + 4 VQA images of 32 px, 2 questions each, and the demo vocabulary."""
    out = tmp_path_factory.mktemp("ask") / "demo"
    write_demo_data(out, PhantomSpec(seed=0, image_size=32, train_captions=8, val_captions=8, samples_per_shard=8,
                                     vqa_train_images=8, vqa_test_images=4, questions_per_image=2))
    return out


def _evaluate(run: Path, out: Path, *extra: str) -> list[dict]:
    """launch/evaluate.py on the run's whole test split (in-process: one torch import for the module)."""
    assert load_launch("evaluate").main(["--checkpoint", str(run), "--out", str(out), "vqa.eval_limit=null",
                                         *extra]) == 0
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def medblip(data, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A tiny MedBLIP VQA run (4 steps, seed 42) and evaluate.py's predictions on its 8 test questions."""
    run = tmp_path_factory.mktemp("ask_medblip") / "run"
    r = run_entry("train.py", "--recipe", MEDBLIP, *tiny_overrides(run, data / "vqa"), "train.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    return run, _evaluate(run, run.parent / "eval")


@pytest.fixture(scope="module")
def blip2(data, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A tiny BLIP-2 VQA run (random towers, 2 steps) and evaluate.py's predictions (generate and rank)."""
    run = tmp_path_factory.mktemp("ask_blip2") / "run"
    vocab = str(data / "vocab.txt")
    r = run_entry("train.py", "--recipe", BLIP2, f"run.dir={run}", "run.resume=none", "run.init_from=null",
                  "model.llm_weights=null", f"model.tokenizer={vocab}", f"model.llm_tokenizer={vocab}",
                  f"vqa.root={data / 'vqa'}", "image.size=32", "train.max_steps=2", "data.batch_size=8",
                  "vqa.num_beams=2", "vqa.eval_limit=2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return run, _evaluate(run, run.parent / "eval")


def _same_top(answer, expected: str) -> bool:
    """The top answer is `expected`, or ties it within float noise (a lone question pads differently from a batch,
    which may move the last bits of a score on another CPU's kernels)."""
    scores = {r.answer: r.score for r in answer.ranked}
    return answer.top == expected or (expected in scores and scores[answer.top] - scores[expected] < 1e-4)


def _image(data: Path, row: dict) -> Path:
    return data / "vqa" / "VQA_RAD Image Folder" / row["image"]


@pytest.fixture(scope="module")
def medblip_asker(medblip):
    from recipes.common.ask import Asker

    return Asker(str(medblip[0]), device="cpu", top=5)


def test_medblip_top_ranked_answer_is_evaluate_py_prediction(data, medblip, medblip_asker):
    run, rows = medblip
    assert len(rows) == 8
    asker = medblip_asker
    assert asker.kind == "medblip" and asker.mode == "rank"
    for row in rows:  # one question at a time, as a user asks
        answer = asker.ask(_image(data, row), row["question"])
        assert answer.ranked[0].answer == answer.top == answer.prediction and _same_top(answer, row["prediction"])
        scores = [r.score for r in answer.ranked]
        assert scores == sorted(scores, reverse=True) and len(scores) == 4  # vqa.k_test=4 candidates rescored
        assert all(r.answer in asker.candidates for r in answer.ranked)
    # the same questions in one batch, as --questions sends them
    batch = asker.ask_many([(_image(data, r), r["question"]) for r in rows])
    assert [a.top for a in batch] == [r["prediction"] for r in rows]
    # the generated answer is evaluate.py's generate mode
    gen = _evaluate(run, run.parent / "gen", "vqa.inference=generate")
    assert [a.generated for a in batch] == [r["prediction"] for r in gen]


@pytest.mark.slow  # its own BLIP-2 run: ~25 s of training and evaluation at a load of 13 on 2 cores
def test_blip2_top_ranked_answer_is_evaluate_py_rank_prediction(data, blip2):
    from recipes.common.ask import Asker

    run, rows = blip2
    asker = Asker(str(run), device="cpu", top=3)
    assert asker.kind == "blip2" and asker.mode == "generate"  # BLIP-2's metrics.json scores its generated answers
    for row in rows:
        answer = asker.ask(_image(data, row), row["question"])
        assert _same_top(answer, row["prediction_rank"]), (row, answer.ranked)
        assert answer.generated == row["prediction_generate"] == answer.prediction, row
        assert len(answer.ranked) == 3 and answer.ranked[0].score >= answer.ranked[1].score >= answer.ranked[2].score


def test_cli_prints_ranked_answers_for_one_question_and_for_pairs(data, medblip, medblip_asker, tmp_path, capsys):
    run, rows = medblip
    ask = load_launch("ask").main
    image = _image(data, rows[0])
    assert ask(["--checkpoint", str(run), "--image", str(image), "--question", rows[0]["question"], "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert f"question: {rows[0]['question']}" in out and "  2. " in out and "  3. " not in out
    assert f"evaluate.py's answer (rank): {rows[0]['prediction']}" in out
    # pairs as CSV and as JSONL, image paths relative to the file; --json gives the Python call's answers
    pairs = [(image.relative_to(data / "vqa"), r["question"]) for image, r in ((_image(data, r), r) for r in rows)]
    (data / "vqa" / "pairs.csv").write_text("image,question\n" + "".join(f"{i},\"{q}\"\n" for i, q in pairs))
    (data / "vqa" / "pairs.jsonl").write_text("".join(json.dumps({"image": str(i), "question": q}) + "\n"
                                                      for i, q in pairs))
    expected = [a.to_dict() for a in medblip_asker.ask_many([(_image(data, r), r["question"]) for r in rows])]
    for name in ("pairs.csv", "pairs.jsonl"):
        assert ask(["--checkpoint", str(run), "--questions", str(data / "vqa" / name), "--json"]) == 0
        got = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert [{k: v for k, v in g.items() if k != "image"} for g in got] == expected, name


def _one_line_error(ask, args, capsys) -> str:
    assert ask(args) == 2, args
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0], (args, err)
    return err[0]


def test_cli_bad_input_ends_in_one_line(data, medblip, tmp_path, capsys):
    run, rows = medblip
    ask = load_launch("ask").main
    image, q = str(_image(data, rows[0])), rows[0]["question"]
    (tmp_path / "notes.png").write_text("not an image")
    with open(tmp_path / "huge.png", "wb") as f:  # sparse: 40 MB on paper, nothing on disk
        f.truncate(40 * 1024 * 1024)
    bomb = tmp_path / "bomb.png"  # 140 kB of PNG, 144 Mpixel once decoded
    Image.new("L", (12000, 12000)).save(bomb)
    (tmp_path / "cut.jpg").write_bytes(Path(image).read_bytes()[:600])
    dapt = tmp_path / "dapt"
    (dapt / "checkpoints").mkdir(parents=True)
    (dapt / "config.yaml").write_text(f"recipe: recipes.medblip.pretrain\nrun: {{dir: {dapt}}}\n")  # no vqa:
    (tmp_path / "bad.csv").write_text(f"image,question\n{image},what\nmissing.png,what\n")
    cases = [
        (["--image", str(tmp_path / "absent.png"), "--question", q], "image not found"),
        (["--image", str(tmp_path / "notes.png"), "--question", q], "is not an image"),
        (["--image", str(tmp_path / "huge.png"), "--question", q], "larger than the 32 MB"),
        (["--image", str(tmp_path / "cut.jpg"), "--question", q], "cannot be decoded"),
        (["--image", str(tmp_path), "--question", q], "not a file"),
        (["--image", image, "--question", "  "], "the question is empty"),
        (["--image", image, "--question", "!!"], "has no words"),
        (["--questions", str(tmp_path / "bad.csv")], "row 2: image not found"),
    ]
    for args, message in cases:
        assert message in _one_line_error(ask, ["--checkpoint", str(run), *args], capsys), args
    assert "checkpoint not found" in _one_line_error(
        ask, ["--checkpoint", str(tmp_path / "no_such_run"), "--image", image, "--question", q], capsys)
    assert "is a recipes.medblip.pretrain run, not a VQA run" in _one_line_error(
        ask, ["--checkpoint", str(dapt), "--image", image, "--question", q], capsys)
    with warnings.catch_warnings():  # the test's own, so PIL's bomb warning is not left to pytest's filter
        warnings.simplefilter("error")
        assert "pixels is more than the" in _one_line_error(
            ask, ["--checkpoint", str(run), "--image", str(bomb), "--question", q], capsys)
    with pytest.raises(SystemExit):  # argparse: a usage line, exit 2
        ask(["--checkpoint", str(run), "--image", image])
    assert "--question" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the web page


@pytest.fixture(scope="module")
def server(medblip_asker):
    """The page's server on 127.0.0.1, a free port, in a thread; its base URL."""
    from recipes.common.ask_web import make_server

    srv = make_server(medblip_asker, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join()


def _multipart(fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            head = f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n' \
                   "Content-Type: application/octet-stream\r\n\r\n"
            parts.append(f"--{boundary}\r\n{head}".encode() + value[1] + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post(url: str, body: bytes, ctype: str, headers: dict | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def test_web_page_answers_equal_the_python_call(data, medblip, medblip_asker, server):
    run, rows = medblip
    with urllib.request.urlopen(server + "/", timeout=60) as r:
        page = r.read().decode()
    assert r.status == 200 and 'type="file"' in page and 'name="question"' in page
    for row in rows[:3]:
        image_bytes = _image(data, row).read_bytes()
        expected = medblip_asker.ask(_image(data, row), row["question"]).to_dict()
        status, ctype, body = _post(server + "/api/ask", *_multipart({"image": ("x.jpg", image_bytes),
                                                                      "question": row["question"]}))
        assert status == 200 and ctype.startswith("application/json"), body
        assert json.loads(body)["answers"] == [expected]
        assert expected["ranked"][0]["answer"] == row["prediction"]
        status, _, body = _post(server + "/api/ask", json.dumps(
            {"image_base64": base64.b64encode(image_bytes).decode(), "question": row["question"]}).encode(),
            "application/json")
        assert status == 200 and json.loads(body)["answers"] == [expected]
    # the form as a browser without JavaScript sends it: the page again, with the ranked answers
    status, ctype, body = _post(server + "/", *_multipart({"image": ("x.jpg", image_bytes),
                                                           "question": rows[2]["question"]}))
    assert status == 200 and ctype.startswith("text/html")
    assert f"<td>{expected['ranked'][0]['answer']}</td>" in body and "data:image;base64," in body


def test_web_page_bad_input_is_a_4xx_with_one_line(data, medblip, server):
    run, rows = medblip
    image_bytes = _image(data, rows[0]).read_bytes()
    q = rows[0]["question"]
    cases = [
        ({"question": q}, 400, "no image"),
        ({"image": ("x.jpg", b""), "question": q}, 400, "no image"),
        ({"image": ("notes.txt", b"plain text, not pixels"), "question": q}, 400, "is not an image"),
        ({"image": ("x.jpg", image_bytes), "question": "   "}, 400, "the question is empty"),
        ({"image": ("x.jpg", image_bytes)}, 400, "the question is empty"),
        ({"image": ("x.jpg", image_bytes), "question": q, "top": "lots"}, 400, "top must be a whole number"),
    ]
    for fields, code, message in cases:
        status, ctype, body = _post(server + "/api/ask", *_multipart(fields))
        assert status == code and message in json.loads(body)["error"], (fields.keys(), status, body)
        assert "\n" not in json.loads(body)["error"] and "Traceback" not in body
        status, ctype, body = _post(server + "/", *_multipart(fields))  # the page shows the same line
        assert status == code and ctype.startswith("text/html") and message in body and "Traceback" not in body
    huge = b"\0" * (33 * 1024 * 1024)
    status, _, body = _post(server + "/api/ask", *_multipart({"image": ("big.png", huge), "question": q}))
    assert status == 413 and "at most 32 MB" in json.loads(body)["error"]
    status, _, body = _post(server + "/api/ask", b"question=x", "application/x-www-form-urlencoded")
    assert status == 415 and "multipart/form-data" in json.loads(body)["error"]
    status, _, body = _post(server + "/api/ask", b"{not json", "application/json")
    assert status == 400 and "not JSON" in json.loads(body)["error"]
    status, _, body = _post(server + "/api/ask", b'{"image_base64": "***", "question": "x"}', "application/json")
    assert status == 400 and "not base64" in json.loads(body)["error"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server + "/etc/passwd", timeout=30)
    assert e.value.code == 404
