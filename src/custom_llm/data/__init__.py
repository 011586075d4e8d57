"""Data: text sources (and the embedded default corpus), cached token files, seeded batch loading.

    tokenizer, ds = prepare_data(["corpus/"], vocab_size=8192, min_tokens=seq_len + 1)
    loader = BatchLoader(ds.train, batch_size=16, seq_len=256, seed=0)
    x, y = loader.next_batch()
"""

from .loader import BatchLoader, sequential_batches, unigram_entropy
from .prepare import cached_train_tokenizer, prepare_data, tokenizer_training_subset
from .sources import Document, default_corpus_documents, default_corpus_files, default_corpus_root, load_documents
from .tokens import (TokenDataset, build_token_dataset, corpus_fingerprint, default_cache_dir, encode_documents,
                     split_documents, token_dtype)

__all__ = ["BatchLoader", "Document", "TokenDataset", "build_token_dataset", "cached_train_tokenizer",
           "corpus_fingerprint", "default_cache_dir", "default_corpus_documents", "default_corpus_files",
           "default_corpus_root", "encode_documents", "load_documents", "prepare_data", "sequential_batches",
           "split_documents", "token_dtype", "tokenizer_training_subset", "unigram_entropy"]
