"""The standard metrics `python -m train eval --data` reports (torch-free).

    from train.evaluation.metrics import caption_scores, vqa_accuracy, retrieval_recall
    caption_scores({"1": "a dog on grass"}, {"1": ["a dog runs on the grass", ...]})   # {"bleu4", "cider"}
    vqa_accuracy(["two"], [["2", "2", "two", ...]])                                      # VQAv2 accuracy
    retrieval_recall(i2t_scores, text_image)                                              # R@1/5/10 both ways

* Captions: BLEU-4 and CIDEr-D from `pycocoevalcap` (the package of the COCO caption evaluation server;
  its BLEU and CIDEr scorers are pure Python). Its PTB tokenizer needs Java, so the texts are tokenised
  here the way it tokenises them for these metrics: lower-cased, punctuation split off and dropped
  (the punctuation list is pycocoevalcap's). CIDEr's document frequencies come from the references of
  the evaluated set, as in the COCO evaluation.
* VQA: VQAv2's accuracy, min(1, humans who gave the answer / 3) averaged over the 10 leave-one-out subsets
  of the 10 human answers, after the official answer normalisation (punctuation, number words to
  digits, articles, contractions) of the VQA evaluation script.
* Retrieval: recall@1/5/10 image->text (an image is right when any of its captions is in the top k) and
  text->image, from a score matrix (ITC similarities re-ranked by ITM on the top candidates: see
  train.shapescaps.evaluate).
"""
import re

import numpy as np

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}
_PTB_TOKEN = re.compile(r"\.\.\.|--|``|''|[A-Za-z0-9]+(?:'[A-Za-z]+)?|[^\sA-Za-z0-9]")


def coco_tokenize(text: str) -> str:
    """A caption as the COCO evaluation scores it: lower-case tokens, punctuation removed."""
    tokens = _PTB_TOKEN.findall(text.lower().replace("(", " -LRB- ").replace(")", " -RRB- "))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and t not in ("-lrb-", "-rrb-"))


def caption_scores(predictions: dict, references: dict) -> dict:
    """{"bleu4", "cider"} of predictions {id: caption} against references {id: [captions]} (same ids)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same ids")
    res = {k: [coco_tokenize(v)] for k, v in predictions.items()}
    gts = {k: [coco_tokenize(r) for r in refs] for k, refs in references.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


# ----------------------------------------------------------------------------- VQAv2 (the official normalisation)
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_normalise(answer: str) -> str:
    """The VQA evaluation's answer normalisation."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(answer))


def vqa_accuracy(predictions: list[str], answers: list[list[str]]) -> float:
    """Mean VQAv2 accuracy of `predictions` against each question's human `answers`."""
    scores = []
    for pred, gts in zip(predictions, answers):
        pred = vqa_normalise(pred)
        gts = [vqa_normalise(g) for g in gts]
        if len(gts) == 1:
            scores.append(float(pred == gts[0]))
            continue
        subsets = [gts[:i] + gts[i + 1:] for i in range(len(gts))]
        scores.append(float(np.mean([min(1.0, sum(g == pred for g in s) / 3) for s in subsets])))
    return float(np.mean(scores)) if scores else float("nan")


# ----------------------------------------------------------------------------- retrieval

def retrieval_recall(scores: np.ndarray, text_image: np.ndarray, ks=(1, 5, 10)) -> dict:
    """scores [I, T] (higher = better match), text_image [T]: the image each text describes ->
    {"i2t_r1", ..., "t2i_r10"}."""
    scores = np.asarray(scores)
    text_image = np.asarray(text_image)
    out = {}
    i2t_rank = np.argsort(-scores, axis=1, kind="stable")  # [I, T]
    t2i_rank = np.argsort(-scores.T, axis=1, kind="stable")  # [T, I]
    for k in ks:
        hit_i = [(text_image[i2t_rank[i, :k]] == i).any() for i in range(scores.shape[0])]
        hit_t = [(t2i_rank[t, :k] == text_image[t]).any() for t in range(scores.shape[1])]
        out[f"i2t_r{k}"] = float(np.mean(hit_i))
        out[f"t2i_r{k}"] = float(np.mean(hit_t))
    return out
