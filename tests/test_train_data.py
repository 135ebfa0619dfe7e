"""attngraph train's data: the numbers task, parallel text files and their errors, the shared vocabulary,
batches by length, and the metrics (exact match, BLEU)."""

from __future__ import annotations

import numpy as np
import pytest

from attngraph.train import data as D
from attngraph.train.metrics import corpus_bleu, exact_match


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"), (115, "one hundred fifteen"),
    (4096, "four thousand ninety six"), (700010, "seven hundred thousand ten"), (1000, "one thousand"),
    (20019, "twenty thousand nineteen"), (999999, "nine hundred ninety nine thousand nine hundred ninety nine")])
def test_number_words(n, words):
    assert D.number_words(n) == words


def test_the_numbers_task_never_trains_on_its_validation_set():
    task = D.NumbersTask()
    assert task.valid() == D.NumbersTask().valid()  # fixed
    assert len(task.valid()) == 1000 and task.pair(4096) == ("4 0 9 6", "four thousand ninety six")
    drawn = task.draw(5000, np.random.default_rng(0))
    assert not {s for s, _ in drawn} & {s for s, _ in task.valid()}
    lengths = np.bincount([len(s.split()) for s, _ in drawn])
    assert lengths[1:].min() > 600  # every number of digits about as often
    tok = D.build_tokenizer(task.vocabulary_text())
    for s, t in drawn[:200] + task.valid()[:200]:  # every word of the task is in its vocabulary
        assert D.UNK_ID not in D.encode(tok, s) + D.encode(tok, t)
    with pytest.raises(ValueError):
        D.number_words(1_000_000)


def test_parallel_text_errors_name_the_file_and_line(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("a b\tb a\n\n c \t c\n")
    assert D.read_pairs(str(good)) == [("a b", "b a"), ("c", "c")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\nno tab here\n")
    with pytest.raises(D.DataError, match=r"bad.tsv:2: expected 'source<TAB>target', got 1"):
        D.read_pairs(str(bad))
    bad.write_text("a\tb\n\tb\n")
    with pytest.raises(D.DataError, match=r"bad.tsv:2: the source is empty"):
        D.read_pairs(str(bad))
    bad.write_text("\n\n")
    with pytest.raises(D.DataError, match="no pairs"):
        D.read_pairs(str(bad))
    with pytest.raises(D.DataError, match="no such file"):
        D.read_pairs(str(tmp_path / "missing.tsv"))


def test_one_vocabulary_and_batches_by_length():
    tok = D.build_tokenizer(["a b c", "c d"])
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert D.encode(tok, "a d zz") == [tok.token_to_id("a"), tok.token_to_id("d"), D.UNK_ID]
    assert D.decode(tok, D.encode(tok, "c a") + [D.EOS_ID, tok.token_to_id("b")]) == "c a"
    rng = np.random.default_rng(0)
    pairs = [(list(range(4, 4 + n)), list(range(4, 4 + m))) for n, m in rng.integers(1, 30, (200, 2))]
    seen = 0
    for b in D.length_batches(pairs, 256, np.random.default_rng(1)):
        rows, longest = b["src"].shape[0], max(b["src"].shape[1], b["tgt"].shape[1])
        assert rows * longest <= 256
        np.testing.assert_array_equal(b["tgt"][:, 0], D.BOS_ID)  # teacher forcing: <s> y, labels y </s>
        for t, lab in zip(b["tgt"], b["labels"]):
            y = lab[lab != D.PAD_ID]
            assert y[-1] == D.EOS_ID and list(t[1:len(y)]) == list(y[:-1])
        seen += rows
    assert seen == len(pairs)


def test_a_bpe_vocabulary_round_trips_text(tmp_path):
    """--tokenizer bpe: merges learned from the data, the specials first, words it never saw spelled in pieces
    and decoded back to the same text (also after saving), characters it never saw named as unknown."""
    texts = [D.number_words(n) for n in range(0, 100000, 37)]
    tok = D.build_tokenizer(texts, "bpe", vocab_size=120)
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tok.get_vocab_size() <= 120
    for text in ("nine hundred ninety nine thousand", "one hundred fifteen", "teen ninety fourteen"):
        ids = D.encode(tok, text)
        assert D.UNK_ID not in ids and D.decode(tok, ids + [D.EOS_ID, 7]) == text
    assert len(D.encode(tok, "seventy seven")) < len("seventy seven")  # pieces, not characters
    tok.save(str(tmp_path / "tokenizer.json"))
    again = D.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert D.decode(again, D.encode(again, "eighty three thousand")) == "eighty three thousand"
    assert D.unknown_words(tok, "four quiz thousand") == ["quiz"] and D.unknown_words(tok, "four four") == []
    with pytest.raises(D.DataError, match="unknown tokenizer 'sentencepiece'"):
        D.build_tokenizer(texts, "sentencepiece")


def test_bleu_and_exact_match():
    ref = ["the cat sat on the mat"]
    assert corpus_bleu(ref, ref) == pytest.approx(100.0)
    # precisions 5/6, 3/5, 2/4, 1/3, no brevity penalty: 53.73 (sacreBLEU's value)
    assert corpus_bleu(["the cat sat on a mat"], ref) == pytest.approx(53.7285, abs=1e-4)
    # a short hypothesis: the brevity penalty exp(1 - 6/5)
    assert corpus_bleu(["the cat sat on the"], ref) == pytest.approx(100 * np.exp(1 - 6 / 5), abs=1e-6)
    assert exact_match(["a b", "a  c"], ["a b", "a b"]) == 0.5
