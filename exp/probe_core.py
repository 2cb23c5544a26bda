import sys, glob, torch
from pathlib import Path
from tokenizers import Tokenizer
from dsv3.model.model import DSV3ForCausalLM
from dsv3.eval.induction import copy_losses, repeated_random_rows
from dsv3.config import load_recipe
from dsv3.data.corpus import recipe_corpus
from dsv3.data.generated import corpus_words
run = Path(sys.argv[1])
tok = Tokenizer.from_file(glob.glob(str(run / "tokenizer" / "**" / "tokenizer.json"), recursive=True)[0])
model = DSV3ForCausalLM.from_pretrained(run / "pretrain" / "model").eval()
w = corpus_words(recipe_corpus(load_recipe("recipes/tiny.yaml").data)["train"]["text"])
for n in (64, 256, 2000):
    ids = sorted({tok.encode(" " + x).ids[0] for x in w[:n] if len(tok.encode(" " + x).ids) == 1})
    r = copy_losses(model, repeated_random_rows(ids, 16, 64, 7))
    print(n, len(ids), {k: round(v, 2) for k, v in r.items()})
