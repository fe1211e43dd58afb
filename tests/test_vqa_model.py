"""BLIP_VQA on a tiny model: the loss, rank vs brute force, padding masks, generate, frozen vision, weight loading
from pretraining checkpoints, and the transformers export (identical logits and answers)."""
from __future__ import annotations

import pytest
import torch

from recipes.common.tokenizer import load_tokenizer
from recipes.medblip.model.blip_vqa import MedBlipVqa, VqaCollate, load_vqa_weights
from recipes.medblip.model.config import ModelConfig
from recipes.medblip.model.losses import lm_targets

QUESTIONS = ["is there a mass?", "what organ system is shown in this image of the chest?", "which plane?"]
CANDIDATES = ["yes", "no", "left lung", "axial", "the right upper lobe of the lung", "brain", "ct"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled")


def tiny(tokenizer, freeze_vision: bool = True, seed: int = 0, spread: float = 0.3) -> MedBlipVqa:
    """A tiny model whose weights are spread wide enough that scores differ clearly between answers."""
    torch.manual_seed(seed)
    model = MedBlipVqa(ModelConfig(preset="tiny"), freeze_vision=freeze_vision, tokenizer=tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, spread)
    return model.eval()


def questions(tokenizer, texts=QUESTIONS):
    enc = tokenizer(texts, padding="longest", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_loss_is_blips_weighted_sum_over_questions(tokenizer):
    model = tiny(tokenizer)
    samples = [{"image": torch.randn(3, 32, 32), "question": QUESTIONS[0], "answers": ["yes", "no"],
                "weights": [0.75, 0.25]},
               {"image": torch.randn(3, 32, 32), "question": QUESTIONS[1], "answers": ["the chest"],
                "weights": [1.0]}]
    batch = VqaCollate(tokenizer, 35, 32)(samples)
    assert batch["answer_counts"].tolist() == [2, 1] and batch["answer_ids"].shape[0] == 3
    loss = model(batch)["losses"]["vqa"]
    assert loss.dtype == torch.float32
    # by hand, one answer at a time through transformers' own smoothed loss (reduction="none" sums tokens)
    expected = 0.0
    for q, (answer, weight) in [(0, ("yes", 0.75)), (0, ("no", 0.25)), (1, ("the chest", 1.0))]:
        q_ids, q_mask = questions(tokenizer, [samples[q]["question"]])
        states = model.encode_question(model.image_embeddings(samples[q]["image"][None]), q_ids, q_mask)
        a = tokenizer([answer], return_tensors="pt")["input_ids"]
        a[:, 0] = tokenizer.bos_token_id
        out = model.text_decoder(a, encoder_hidden_states=states, labels=lm_targets(a, 0), reduction="none")
        expected += weight * out.loss[0].item()
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)


def test_chance_level_is_the_uniform_predictions_loss(tokenizer):
    import math

    from recipes.medblip.model.blip_vqa import answer_loss

    model = tiny(tokenizer)
    samples = [{"image": torch.randn(3, 32, 32), "question": QUESTIONS[0], "answers": ["yes", "no"],
                "weights": [0.75, 0.25]},
               {"image": torch.randn(3, 32, 32), "question": QUESTIONS[1], "answers": ["the chest"],
                "weights": [1.0]}]
    batch = VqaCollate(tokenizer, 35, 32)(samples)
    # scored tokens: "yes [SEP]", "no [SEP]", "the chest [SEP]" -> (0.75 * 2 + 0.25 * 2 + 1 * 3) / 2 questions
    assert batch["answer_tokens"] == pytest.approx(2.5)
    chance = model(batch)["chance"]
    assert chance == {"vqa": pytest.approx(2.5 * math.log(30524))} and type(chance["vqa"]) is float
    ids = batch["answer_ids"].clone()
    ids[:, 0] = tokenizer.bos_token_id
    uniform = torch.zeros(*ids.shape, 30524)
    assert answer_loss(uniform, lm_targets(ids, 0), batch["answer_weights"], 2).item() == \
        pytest.approx(chance["vqa"], rel=1e-6)


def test_rank_returns_the_best_scoring_candidate(tokenizer):
    model = tiny(tokenizer)
    image = torch.randn(len(QUESTIONS), 3, 32, 32)
    q_ids, q_mask = questions(tokenizer)
    a_ids, a_mask = model.encode_answers(CANDIDATES)
    for smoothing in (0.0, 0.1):
        # brute force: every candidate scored for each question alone (no padding at all)
        brute = []
        for i, text in enumerate(QUESTIONS):
            ids, mask = questions(tokenizer, [text])
            states = model._question_states(image[i:i + 1], ids, mask)
            n = len(CANDIDATES)
            scores = model.answer_log_likelihood(states.expand(n, -1, -1), mask.expand(n, -1), a_ids, a_mask,
                                                 smoothing)
            brute.append(scores)
        brute = torch.stack(brute)  # [Q, A]
        index, score = model.rank(image, q_ids, q_mask, a_ids, a_mask, k=len(CANDIDATES), label_smoothing=smoothing)
        assert index.tolist() == brute.argmax(1).tolist()
        torch.testing.assert_close(score, brute.max(1).values, atol=1e-4, rtol=1e-5)
        # with k < A, the best among the k candidates with the most probable first token (BLIP's rank_answer)
        k = 3
        start = torch.full((1, 1), tokenizer.bos_token_id)
        for i, text in enumerate(QUESTIONS):
            ids, mask = questions(tokenizer, [text])
            states = model._question_states(image[i:i + 1], ids, mask)
            first = model.text_decoder(start, encoder_hidden_states=states).logits[0, 0].softmax(-1)
            top = first[a_ids[:, 1]].topk(k).indices
            best = top[brute[i, top].argmax()]
            got, _ = model.rank(image[i:i + 1], ids, mask, a_ids, a_mask, k=k, label_smoothing=smoothing)
            assert got.item() == best.item()
    assert len(set(index.tolist())) > 1  # the questions do get different answers
    assert model.predict(image, q_ids, q_mask, candidates=CANDIDATES, k=7) == [CANDIDATES[i] for i in index]


def test_padded_questions_score_as_unpadded(tokenizer):
    """The answer decoder must not attend to question padding (transformers' BLIP drops that mask)."""
    model = tiny(tokenizer)
    image = torch.randn(2, 3, 32, 32)
    q_ids, q_mask = questions(tokenizer, QUESTIONS[:2])  # the first question is padded
    assert q_mask[0].sum() < q_mask.shape[1]
    a_ids, a_mask = model.encode_answers(["yes", "no"])
    padded = model.answer_log_likelihood(model._question_states(image, q_ids, q_mask), q_mask, a_ids, a_mask)
    ids, mask = questions(tokenizer, QUESTIONS[:1])
    alone = model.answer_log_likelihood(model._question_states(image[:1], ids, mask), mask, a_ids[:1], a_mask[:1])
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)


def test_generate_is_batch_independent(tokenizer):
    model = tiny(tokenizer)
    image = torch.randn(3, 3, 32, 32)
    q_ids, q_mask = questions(tokenizer)
    ids = model.generate_ids(image, q_ids, q_mask)
    assert ids.shape[1] <= 10 and (ids[:, 0] == tokenizer.bos_token_id).all()  # BLIP: [DEC] + at most 9 tokens
    batched = tokenizer.batch_decode(ids, skip_special_tokens=True)
    alone = [model.generate(image[i:i + 1], *questions(tokenizer, [t]))[0] for i, t in enumerate(QUESTIONS)]
    assert batched == alone and all(isinstance(a, str) and a for a in batched)


def test_frozen_vision_does_not_move(tokenizer):
    model = tiny(tokenizer, freeze_vision=True).train()
    assert not model.visual_encoder.training  # frozen: no drop-path noise either
    vision = {k: v.clone() for k, v in model.visual_encoder.state_dict().items()}
    text = model.text_encoder.embeddings.word_embeddings.weight.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    samples = [{"image": torch.randn(3, 32, 32), "question": q, "answers": [a], "weights": [1.0]}
               for q, a in zip(QUESTIONS, ["yes", "chest", "axial"])]
    batch = VqaCollate(tokenizer, 35, 32)(samples)
    for _ in range(3):
        opt.zero_grad()
        model(batch)["losses"]["vqa"].backward()
        opt.step()
    assert all(torch.equal(vision[k], v) for k, v in model.visual_encoder.state_dict().items())
    assert all(p.grad is None for p in model.visual_encoder.parameters())
    assert not torch.equal(text, model.text_encoder.embeddings.word_embeddings.weight)
    unfrozen = tiny(tokenizer, freeze_vision=False).train()
    before = unfrozen.visual_encoder.cls_token.clone()
    opt = torch.optim.AdamW([p for p in unfrozen.parameters() if p.requires_grad], lr=1e-2)
    unfrozen(batch)["losses"]["vqa"].backward()
    opt.step()
    assert not torch.equal(before, unfrozen.visual_encoder.cls_token)


def test_half_precision_module_gives_fp32_loss(tokenizer):
    model = tiny(tokenizer, spread=0.02).to(torch.bfloat16).train()
    samples = [{"image": torch.randn(3, 32, 32), "question": QUESTIONS[0], "answers": ["yes"], "weights": [1.0]}] * 2
    loss = model(VqaCollate(tokenizer, 35, 32)(samples))["losses"]["vqa"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("tie_lm_head", [True, False])
def test_init_from_pretraining_checkpoint(tokenizer, tmp_path, tie_lm_head):
    """BLIP_VQA's rule: text_encoder -> question encoder, text_decoder -> answer decoder; heads dropped. A file
    whose LM head is apart from the word embeddings (tie_lm_head=false) gives the answer decoder the head."""
    from recipes.medblip.model.blip_pretrain import MedBlipPretrain
    from recipes.medblip.model.weights import save_weights

    torch.manual_seed(1)
    pre = MedBlipPretrain(ModelConfig(preset="tiny", queue_size=8, tie_lm_head=tie_lm_head), tokenizer=tokenizer)
    path = save_weights(pre, tmp_path / "pretrain.pth")  # BLIP's {'model': state_dict} layout
    vqa = tiny(tokenizer)
    report = load_vqa_weights(vqa, str(path))
    assert not report.missing and any("pretraining-only" in n for n in report.notes)
    assert any("tied to the pretraining LM head" in n for n in report.notes) == (not tie_lm_head)
    assert vqa.text_decoder.cls.predictions.decoder.weight is vqa.text_decoder.bert.embeddings.word_embeddings.weight
    pre_sd, sd = pre.state_dict(), vqa.state_dict()
    for k, v in sd.items():
        if k == "text_decoder.bert.embeddings.word_embeddings.weight":  # tied to the head, as BLIP_VQA loads it
            assert torch.equal(v, pre_sd["text_decoder.cls.predictions.decoder.weight"])
        else:
            assert torch.equal(v, pre_sd[k]), k
    # a PSD run's module wraps the student: 'student.' prefix
    wrapped = {f"student.{k}": v for k, v in pre_sd.items()}
    torch.save(wrapped, tmp_path / "psd.pt")
    again = tiny(tokenizer, seed=5)
    report = load_vqa_weights(again, str(tmp_path / "psd.pt"))
    assert not report.missing
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())


def test_export_to_transformers_gives_identical_logits_and_answers(tokenizer, tmp_path):
    from transformers import BlipForQuestionAnswering, BlipProcessor

    from recipes.common.image_text import ImageConfig
    from recipes.medblip.model.to_transformers import export_vqa

    model = tiny(tokenizer)
    out = export_vqa(model, tmp_path / "hf", ImageConfig(size=32))
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    hf = BlipForQuestionAnswering.from_pretrained(out).eval()
    processor = BlipProcessor.from_pretrained(out)
    image = torch.randn(1, 3, 32, 32)
    answers_ids, _ = model.encode_answers(["the right upper lobe"])
    answers_ids[:, 0] = tokenizer.bos_token_id
    for text in QUESTIONS:
        enc = processor.tokenizer(text, return_tensors="pt")
        assert enc["input_ids"][0, 0].item() == tokenizer.enc_token_id  # BLIP_VQA's question input as is
        with torch.no_grad():
            img_hf = hf.vision_model(pixel_values=image).last_hidden_state
            states_hf = hf.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                        encoder_hidden_states=img_hf).last_hidden_state
            logits_hf = hf.text_decoder(answers_ids, encoder_hidden_states=states_hf).logits
            states = model._question_states(image, enc["input_ids"], enc["attention_mask"])
            logits = model.text_decoder(answers_ids, encoder_hidden_states=states).logits
        torch.testing.assert_close(logits_hf, logits, atol=1e-4, rtol=1e-4)  # logits of size ~10
        generated = hf.generate(input_ids=enc["input_ids"], pixel_values=image, attention_mask=enc["attention_mask"],
                                num_beams=3, max_length=10, min_length=1)
        ours = model.generate(image, enc["input_ids"], enc["attention_mask"])
        assert processor.tokenizer.batch_decode(generated, skip_special_tokens=True) == ours
    # and back: the exported directory loads into our model unchanged
    back = tiny(tokenizer, seed=3)
    report = load_vqa_weights(back, str(out))
    assert not report.missing
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
