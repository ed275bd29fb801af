"""Tokenization throughput on a config's corpora (the embedded ones capped to a few seconds each).

`python bench/bench_data.py [config.yaml]` prints a table; `bench/run.py` calls `rows(cfg)`.
"""

from __future__ import annotations

import sys
import time

# Documents per corpus: enough for a stable rate, few enough that the whole suite stays under 30 s.
DOCUMENTS = {"embedded:shakespeare": 24, "embedded:stdlib": 300}
DEFAULT_DOCUMENTS = 100


def rows(cfg) -> list[dict]:
    from mcx_core.data import TOKENIZE_BATCH, iter_documents, tokenize_texts
    from mcx_core.model.base import load_tokenizer

    tokenizer = load_tokenizer(cfg.base_model, cfg.dataset, root=cfg.root)
    out = []
    for name, corpus in sorted(cfg.dataset.corpora.items()):
        cap = min(corpus.max_documents or sys.maxsize, DOCUMENTS.get(corpus.source, DEFAULT_DOCUMENTS))
        docs = list(iter_documents(name, corpus.model_copy(update={"max_documents": cap}), root=cfg.root))
        texts = [d.text for d in docs]
        t0 = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), TOKENIZE_BATCH):  # batched as the dataset build does
            tokens += sum(len(ids) for ids in tokenize_texts(tokenizer, texts[i : i + TOKENIZE_BATCH]))
        seconds = time.perf_counter() - t0
        out.append(
            {
                "bench": "tokenization",
                "value": tokens / seconds,
                "unit": "tokens/s",
                "note": f"{name} ({corpus.source}): {len(docs)} docs, {tokens:,} tokens in {seconds:.2f} s",
            }
        )
    return out


def default_config():
    from mcx_core.config import BaseModelConfig, CorpusConfig, DatasetConfig, MegaContextConfig

    corpora = {
        "narrative": CorpusConfig(source="embedded:shakespeare"),
        "code": CorpusConfig(source="embedded:stdlib", kind="code"),
    }
    return MegaContextConfig(
        name="bench-data",
        dataset=DatasetConfig(corpora=corpora),
        base_model=BaseModelConfig(source="tiny_random"),
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        from mcx_core.config import load_config

        config = load_config(sys.argv[1])
    else:
        config = default_config()
    print(f"{'bench':<14} {'value':>14} {'unit':<10} note")
    for r in rows(config):
        print(f"{r['bench']:<14} {r['value']:>14,.0f} {r['unit']:<10} {r['note']}")
