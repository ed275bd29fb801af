"""Compression: GistNet, a block of 32 vectors -> one gist."""
