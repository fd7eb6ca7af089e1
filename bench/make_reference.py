"""Reference embeddings and token ids from sentence-transformers, for tests that must not need torch.

Run once, in an environment with the `bench` extra (sentence-transformers, torch CPU):

    python bench/make_reference.py path/to/all-MiniLM-L6-v2 tests/data/minilm_reference.json

It writes, for each sentence below: the HF tokenizer's token ids (truncated at the model's
max_seq_length, 256 word pieces for all-MiniLM-L6-v2) and the normalized embedding computed by
sentence-transformers (float32, as decimal strings rounded to 8 significant digits).
"""

import json
import sys

SENTENCES = [
    "This is a test sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "Héllo, Wörld! Café naïve résumé — déjà vu.",
    "UPPER case and lower case should embed the same way.",
    "Punctuation: commas, semicolons; colons: and (parentheses)! Right?",
    "Numbers like 3.14159 and 2,718 and 1e-9 appear in text too.",
    "unaffable antidisestablishmentarianism floccinaucinihilipilification",
    "中文字符 and 日本語 mixed with English words.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "A cat sits on the mat.",
    "A kitten is resting on a rug.",
    "The stock market fell sharply today.",
    " ".join(["A very long document that goes on and on about many things."] * 40),
]


def main() -> None:
    from sentence_transformers import SentenceTransformer

    folder, out = sys.argv[1], sys.argv[2]
    model = SentenceTransformer(folder, device="cpu")
    tokenizer = model.tokenizer
    vectors = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    rows = []
    for text, vec in zip(SENTENCES, vectors):
        ids = tokenizer(text, truncation=True, max_length=model.max_seq_length)["input_ids"]
        rows.append({"text": text, "token_ids": ids, "embedding": [float(f"{x:.8g}") for x in vec]})
    doc = {"model": "sentence-transformers/all-MiniLM-L6-v2", "max_seq_length": model.max_seq_length,
           "normalized": True, "sentences": rows}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(rows)} reference embeddings to {out}")


if __name__ == "__main__":
    main()
