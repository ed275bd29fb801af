"""Block datasets: tokenized, block-aligned samples cut from the narrative and code corpora.

A sample is `context_tokens + horizon` consecutive tokens of ONE document, starting at a multiple of
`stride_tokens` (itself a multiple of `block_size`) counted from the document start, so LOD0 blocks,
and the gists built from them, line up with the document. Splits are by *work* (both editions of a
play, every file of a stdlib package), so nothing evaluated on was trained on. Output:

    <output_dir>/<corpus>/<split>.arrow   one row per sample, Arrow IPC file (schema: `sample_schema`)
    <output_dir>/manifest.json            what was built from what; written LAST, so a manifest
                                          means every file it lists is complete

Same config + tokenizer + source files -> byte-identical files (no timestamps anywhere). A build whose
manifest already matches (config hash, seed, source fingerprints, file checksums) is skipped.

Reading in the order data flows: `corpora` (documents and sources), `blocks` (splits, samples, the
build), `store` (reading a built dataset), `verify` (its checks), `recall` (synthetic recall samples).
The names below are the package's public face: `from mcx_core import data; data.load_samples(...)`.
"""

from mcx_core.data.blocks import (  # noqa: F401
    TOKENIZE_BATCH,
    assign_splits,
    build_block_datasets,
    sample_schema,
    stride_tokens,
    tokenize_texts,
)
from mcx_core.data.corpora import (  # noqa: F401
    SHAKESPEARE_HINT,
    SINGLE_EDITION_WORKS,
    STDLIB_SKIP_DIRS,
    CorpusSpec,
    Document,
    DocumentStats,
    SourceFile,
    corpus_specs,
    iter_documents,
    list_sources,
    shakespeare_texts_dir,
    shakespeare_work_id,
    strip_gutenberg,
)
from mcx_core.data.store import (  # noqa: F401
    MANIFEST,
    load_eval_samples,
    load_manifest,
    load_samples,
    load_split,
    split_summary,
    train_doc_ids,
    train_ids,
)
from mcx_core.data.verify import verify_document_boundaries, verify_retokenization, verify_split_isolation  # noqa: F401
