"""The tokenizers the trainer builds (train/blip2/tokenizers.py): the same corpus gives the same ids in every
process, which the demo recipe's bit-for-bit reproduction rests on."""
import json
import subprocess
import sys

import pytest

from train.blip2.tokenizers import QFORMER_SPECIALS, build_qformer_tokenizer, wordpiece_vocab

VOCABS = """
import json
from train.shapescaps.synthetic import text_corpus
from train.blip2.tokenizers import build_qformer_tokenizer, build_tokenizer
corpus = list(text_corpus(n_train=2000, seed=0))
print(json.dumps([build_qformer_tokenizer(512, corpus).get_vocab(), build_tokenizer(512, corpus).get_vocab()]))
"""


def test_same_corpus_same_vocabularies_in_every_process():
    """tokenizers' WordPieceTrainer broke ties differently per process (hash seeds): three runs, three vocabs."""
    runs = [json.loads(subprocess.run([sys.executable, "-c", VOCABS], capture_output=True, text=True, check=True)
                       .stdout) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_wordpiece_vocab_keeps_words_whole_and_spells_the_rest():
    corpus = ["a red circle on the left", "a red square", "Question: where is it? Answer: left"]
    vocab = wordpiece_vocab(corpus, 200)
    assert list(vocab)[: len(QFORMER_SPECIALS)] == QFORMER_SPECIALS
    assert {"red", "circle", "left", "question", "?", "##r", "##?"} <= set(vocab) and "x" not in vocab
    assert list(vocab).index("red") < list(vocab).index("circle")  # more frequent first
    tok = build_qformer_tokenizer(200, corpus)
    ids = tok("A red circle").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert tok.decode(tok("a cold rose").input_ids, skip_special_tokens=True) == "a cold rose"  # spelled in pieces
    with pytest.raises(ValueError, match="qformer_vocab_size"):
        wordpiece_vocab(corpus, 10)
